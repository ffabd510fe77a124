r"""Converts a Hugging Face (or GGUF) LLaMA-family model to an Orbax checkpoint.

  python -m convert.hf_to_orbax --hf_dir DIR --out_dir DIR [--dtype bfloat16]
  python -m convert.hf_to_orbax --gguf FILE --out_dir DIR

Writes into a temporary directory and renames it into place, so a failure
leaves nothing behind. Errors print one line and exit non-zero.
"""

import sys

from absl import app
from absl import flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_HF_DIR.value) == bool(_GGUF.value):
    raise app.UsageError("give exactly one of --hf_dir and --gguf")
  try:
    path = checkpoint.convert(
        _HF_DIR.value or _GGUF.value, _OUT_DIR.value, dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value, allow_pickle=_ALLOW_PICKLE.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
