"""Orbax round trip and the convert CLI's error handling."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from quarot_jax import checkpoint
from quarot_jax import hf
from quarot_jax import model
from tests import hf_models

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hf_to_orbax_round_trip_gives_identical_logits(tmp_path):
  path, _ = hf_models.tiny_hf_model("qwen2")
  out = checkpoint.convert(path, str(tmp_path / "ckpt"))
  params, config = hf.load_hf(path)
  restored, restored_config = checkpoint.load(out)
  assert restored_config == config
  tokens = hf_models.random_tokens(config.vocab_size, 2, 8)
  want, _ = model.forward(params, tokens, config)
  got, _ = model.forward(restored, tokens, restored_config)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_into_like(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  out = checkpoint.save_params(params, str(tmp_path / "c"), config)
  restored, _, quant = checkpoint.load_params(out, like=params)
  assert quant is None
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refuses_non_empty_out_dir_and_leaves_it_alone(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  out = tmp_path / "busy"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="not empty"):
    checkpoint.convert(path, str(out))
  assert os.listdir(out) == ["keep.txt"]
  checkpoint.convert(path, str(out), overwrite=True)
  assert checkpoint.is_checkpoint(str(out))
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_refuses_pickle_without_flag(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  src = tmp_path / "bin"
  src.mkdir()
  (src / "config.json").write_text(open(os.path.join(path,
                                                     "config.json")).read())
  params, _ = hf.load_hf(path)
  torch.save({"model.norm.weight": torch.from_numpy(params["norm"]["scale"])},
             src / "pytorch_model.bin")
  with pytest.raises(ValueError, match="allow_pickle"):
    hf.load_hf(str(src))
  # With the flag it reads the file, then names what is missing.
  with pytest.raises(ValueError, match="missing tensors"):
    hf.load_hf(str(src), allow_pickle=True)


def test_shape_mismatch_and_unsupported_arch(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["intermediate_size"] = 100
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="has shape"):
    hf.load_hf(str(bad))
  cfg["model_type"] = "gpt2"
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    hf.load_hf(str(bad))


def test_cli_prints_one_error_line_and_exits_nonzero(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "convert.hf_to_orbax",
       f"--hf_dir={tmp_path / 'nope'}", f"--out_dir={out}"],
      cwd=_ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error:")
  assert "is not a quarot_jax checkpoint" in proc.stderr
  assert not out.exists()
