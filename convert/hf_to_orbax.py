r"""Converts a Hugging Face (or GGUF) LLaMA-family model to an Orbax checkpoint.

  python -m convert.hf_to_orbax --hf_dir DIR --out_dir DIR [--dtype bfloat16]
  python -m convert.hf_to_orbax --gguf FILE --out_dir DIR
  python -m convert.hf_to_orbax --gguf FILE --out_dir DIR --quantize \
      [--w_method=gptq --calib_windows=128] [--a_bits=16] [--kv_bits=16]

With --quantize the model is rotated (QuaRot) and its decoder linears are
stored as packed int4 with per-channel scales; the checkpoint records the
quantization config (`checkpoint.load_quantized` refuses a mismatch).

Writes into a temporary directory and renames it into place, so a failure
leaves nothing behind. Errors print one line and exit non-zero.
"""

import sys

from absl import app
from absl import flags

from quarot_jax import checkpoint
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
_W_BITS = flags.DEFINE_integer("w_bits", 4, "Weight bits (packed: 4).")
_A_BITS = flags.DEFINE_integer("a_bits", 4, "Activation bits: 4 or 16.")
_KV_BITS = flags.DEFINE_integer("kv_bits", 4, "KV cache bits: 4 or 16.")
_W_METHOD = flags.DEFINE_enum("w_method", "gptq", ["gptq", "rtn"],
                              "Weight quantizer.")
_W_CLIP = flags.DEFINE_bool("w_clip", True, "MSE search of weight ranges.")
_CALIB_WINDOWS = flags.DEFINE_integer(
    "calib_windows", 128, "GPTQ calibration windows (enwiki-gensim).")
_CALIB_SEQLEN = flags.DEFINE_integer("calib_seqlen", 2048,
                                     "Tokens per calibration window.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the random Hadamard signs.")


def _qconfig() -> quarot.QuaRotConfig | None:
  if not _QUANTIZE.value:
    return None
  return quarot.QuaRotConfig(
      w_bits=_W_BITS.value, a_bits=_A_BITS.value, k_bits=_KV_BITS.value,
      v_bits=_KV_BITS.value, w_method=_W_METHOD.value, w_clip=_W_CLIP.value,
      seed=_SEED.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_HF_DIR.value) == bool(_GGUF.value):
    raise app.UsageError("give exactly one of --hf_dir and --gguf")
  try:
    path = checkpoint.convert(
        _HF_DIR.value or _GGUF.value, _OUT_DIR.value, dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value, allow_pickle=_ALLOW_PICKLE.value,
        qconfig=_qconfig(), calib_windows=_CALIB_WINDOWS.value,
        calib_seqlen=_CALIB_SEQLEN.value)
  except (ValueError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
