r"""kv4_decode_attention against XLA decode attention over a bf16 cache.

  python -m experiments.bench_kv4_attention --out_dir=results

Each case (B, S, N x K x H, every row attending to all S slots) times the
packed 4-bit kernel with the model's own config (what it runs with
config=None for bf16 q: `model_config_ms` in the record) and a small
(block_s, num_splits, ...) sweep around it, keeps the fastest, and times
`xla_bf16_attention` (jitted `bf16_decode_attention` on a bf16 cache
[B, S, K, H], the float model's layout) and
`pallas_bf16_flash_decoding` (`pallas_kernels.decode_attention`, what our
bf16 model runs, on the same cache) in the same process.
Records the memory ratio (KV4 bytes / bf16 bytes) and the fraction of HBM
bandwidth (cache bytes read / time / --hbm_gbps, default the H200's 4800 GB/s)
of ours and XLA's; appends
one JSONL line per case to --out_dir/kv4_decode_attention.jsonl.

CPU smoke test (interpret mode, tiny shapes):
  python -m experiments.bench_kv4_attention --batch=1 --seq=64 \
      --heads=4x2x64 --block_s=16 --num_splits=1,2 --interpret \
      --out_dir=/tmp/kv4_bench
"""

import itertools
import shlex
import sys

from absl import app
from absl import flags
import jax

from experiments.lab import benchmarking
from experiments.lab import kv4_attention_cases as cases
from pallas_kernels import decode_attention as float_attn

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_BATCH = flags.DEFINE_list("batch", ["8", "16"], "Batch sizes B.")
_SEQ = flags.DEFINE_list("seq", ["8192", "16384", "32768"], "Slots S.")
_HEADS = flags.DEFINE_list("heads", ["32x32x128", "32x8x128"],
                           "Query heads x kv heads x head dim (NxKxH).")
_BLOCK_S = flags.DEFINE_list("block_s", ["64", "128"], "block_s sweep.")
_SPLITS = flags.DEFINE_list(
    "num_splits", ["default", "2x"],
    "num_splits sweep: integers, 'default' (the heuristic) or '2x' (twice"
    " it).")
_PATHS = flags.DEFINE_list(
    "paths", ["auto"],
    "KV4DecodeAttentionConfig.path sweep: auto, dot, dot_free (dot_free is"
    " skipped where G > 1).")
_NIBBLES = flags.DEFINE_list(
    "nibbles", ["convert"],
    "KV4DecodeAttentionConfig.nibbles sweep: convert, bits (bits only"
    " changes the dot path).")
_SOFTMAX_ROWS = flags.DEFINE_list(
    "softmax_rows", ["all"],
    "KV4DecodeAttentionConfig.softmax_rows sweep: all, one (one only"
    " changes the dot path at G = 1).")
_FLASH = flags.DEFINE_list(
    "flash_configs", ["default"],
    "bf16 flash-decoding baseline configs, the fastest kept: 'default' or"
    " BLOCKxSPLITSxWARPSxSTAGES.")
_WARPS = flags.DEFINE_list("num_warps", ["default"],
                           "num_warps sweep (integers or 'default').")
_STAGES = flags.DEFINE_list("num_stages", ["default"],
                            "num_stages sweep (integers or 'default').")
_HBM_GBPS = flags.DEFINE_float("hbm_gbps", 4800.0,
                               "HBM peak for hbm_fraction (H200: 4800;"
                               " H100 SXM: 3350).")
_INTERPRET = flags.DEFINE_bool("interpret", False,
                               "Pallas interpret mode (CPU smoke tests).")


def _flash_configs() -> list[float_attn.DecodeAttentionConfig | None]:
  """--flash_configs: None for 'default', else the spelled-out configs."""
  out = []
  for spec in _FLASH.value:
    if spec == "default":
      out.append(None)
      continue
    bs, ns, nw, st = map(int, spec.split("x"))
    out.append(float_attn.DecodeAttentionConfig(
        block_s=bs, num_splits=ns, num_warps=nw, num_stages=st))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  command = shlex.join(["python", "-m", "experiments.bench_kv4_attention"]
                       + sys.argv[1:])
  key = iter(jax.random.split(jax.random.key(0), 1000))
  path = f"{_OUT.value}/kv4_decode_attention.jsonl"
  for heads in _HEADS.value:
    n, kv_heads, h = map(int, heads.split("x"))
    for b, s in itertools.product(map(int, _BATCH.value),
                                  map(int, _SEQ.value)):
      print(f"B{b} S{s} N{n} K{kv_heads} H{h}", flush=True)
      r = cases.bench_case(
          next(key), b, s, n, kv_heads, h,
          block_sizes=[int(x) for x in _BLOCK_S.value],
          splits=_SPLITS.value, paths=_PATHS.value,
          interpret=_INTERPRET.value, command=command,
          sweep=dict(warps=_WARPS.value, stages=_STAGES.value,
                     nibbles=_NIBBLES.value,
                     softmax_rows=_SOFTMAX_ROWS.value),
          flash_configs=_flash_configs(), hbm_gbps=_HBM_GBPS.value)
      if r is not None:  # appended per case: a timeout keeps what ran
        benchmarking.append_jsonl(path, [r])
        print("  -> " + benchmarking.summary_line(r)
              + f"  hbm {r['hbm_fraction']:.2f}"
              f" (xla {r['baseline_hbm_fraction']:.2f})", flush=True)


if __name__ == "__main__":
  app.run(main)
