r"""Converts a Hugging Face (or GGUF) LLaMA-family model to an Orbax checkpoint.

  python -m convert.hf_to_orbax --hf_dir DIR --out_dir DIR [--dtype bfloat16]
  python -m convert.hf_to_orbax --gguf FILE --out_dir DIR
  python -m convert.hf_to_orbax --gguf FILE --out_dir DIR --quantize \
      [--w_method=gptq --nsamples=128] [--a_bits=16] [--k_bits=16 --v_bits=16]

With --quantize the model is rotated (QuaRot) and its decoder linears are
stored as packed int4 with per-channel scales; the checkpoint records the
quantization config (`checkpoint.load_quantized` refuses a mismatch).

Writes into a temporary directory and renames it into place, so a failure
leaves nothing behind. Errors print one line and exit non-zero.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from quarot_jax import checkpoint
from quarot_jax import cli_flags
from quarot_jax import quarot

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

_QUANTIZE = flags.DEFINE_bool(
    "quantize", False, "Rotate and quantize to packed int4 (W4A4KV4 by"
    " default) before saving.")
_QUANT = cli_flags.define_quant_flags(
    w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq")
_CALIB_SEQLEN = flags.DEFINE_integer("calib_seqlen", 2048,
                                     "Tokens per calibration window.")


def _qconfig() -> quarot.QuaRotConfig | None:
  if not _QUANTIZE.value:
    return None
  return cli_flags.quarot_config({k: h.value for k, h in _QUANT.items()})


def _check_packable(qconfig: quarot.QuaRotConfig | None) -> None:
  """Names the flags --quantize cannot store as packed int4."""
  problems = [f"--{name}={value} ({need})" for name, value, need
              in quarot.packing_problems(qconfig)] if qconfig else []
  if problems:
    raise ValueError(
        "--quantize stores real packed int4, which does not support "
        + ", ".join(problems) + "; measure other settings simulated with"
        " python -m experiments.accuracy")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_HF_DIR.value) == bool(_GGUF.value):
    raise app.UsageError("give exactly one of --hf_dir and --gguf")
  logging.set_verbosity(logging.WARNING)  # jax and Orbax log INFO lines
  try:
    qconfig = _qconfig()
    _check_packable(qconfig)
    path = checkpoint.convert(
        _HF_DIR.value or _GGUF.value, _OUT_DIR.value, dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value, allow_pickle=_ALLOW_PICKLE.value,
        qconfig=qconfig, calib_windows=_QUANT["nsamples"].value,
        calib_seqlen=_CALIB_SEQLEN.value)
  except (ValueError, NotImplementedError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
