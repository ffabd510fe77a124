r"""Converts a Hugging Face (or GGUF) LLaMA-family model to an Orbax checkpoint.

  python -m convert.hf_to_orbax --hf_dir DIR --out_dir DIR [--dtype bfloat16]
  python -m convert.hf_to_orbax --gguf FILE --out_dir DIR

Writes into a temporary directory and renames it into place, so a failure
leaves nothing behind. Errors print one line and exit non-zero.
"""

import sys

from absl import app
from absl import flags
import ml_dtypes
import numpy as np

from quarot_jax import checkpoint

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory.")
_GGUF = flags.DEFINE_string("gguf", None, "A .gguf file instead of --hf_dir.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Checkpoint to write.",
                               required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Param dtype in the checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a non-empty --out_dir.")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False,
    "Read pickle .bin weights (torch.load with weights_only=True).")

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def convert(source: str, out_dir: str, *, dtype: str = "float32",
            overwrite: bool = False, allow_pickle: bool = False) -> str:
  """Loads `source` (HF dir or .gguf) and saves it at `out_dir`.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    ValueError: bad source, unsupported model, or a non-empty `out_dir`
      without `overwrite`.
  """
  import os  # pylint: disable=g-import-not-at-top
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"--out_dir {out_dir!r} is not empty; pass --overwrite")
  params, config = checkpoint.load(source, dtype=_DTYPES[dtype],
                                   allow_pickle=allow_pickle)
  try:
    tokenizer = checkpoint.load_tokenizer(source)
  except ValueError:
    tokenizer = None  # weights-only source: the checkpoint has none either
  return checkpoint.save_params(params, out_dir, config, tokenizer=tokenizer,
                                overwrite=overwrite)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_HF_DIR.value) == bool(_GGUF.value):
    raise app.UsageError("give exactly one of --hf_dir and --gguf")
  try:
    path = convert(_HF_DIR.value or _GGUF.value, _OUT_DIR.value,
                   dtype=_DTYPE.value, overwrite=_OVERWRITE.value,
                   allow_pickle=_ALLOW_PICKLE.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
