"""The tiny-model helper leaves no folders behind in the temp directory."""

import os
import subprocess
import sys

from tests import hf_models

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_models_live_under_one_root_removed_at_exit():
  path, _ = hf_models.tiny_hf_model("llama2")
  assert path.startswith(hf_models._root() + os.sep)  # pylint: disable=protected-access
  proc = subprocess.run(
      [sys.executable, "-c", "from tests import hf_models;"
       " print(hf_models._root())"], cwd=_ROOT, capture_output=True,
      text=True, check=True)
  root = proc.stdout.strip()
  assert os.path.basename(root).startswith("quarot_jax_tests_")
  assert not os.path.exists(root)
