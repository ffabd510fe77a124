r"""Fused Hadamard + int4 quantize against the same computation in XLA.

  python -m experiments.bench_hadamard_quant --out_dir=results

For each M x K: ours (one Pallas kernel) vs `xla_unfused` (the jitted jnp
reference: fast Hadamard transform, quantize, pack; XLA fuses what it can),
both with and without the Hadamard, writing packed int4 and (case suffix
`_int8`) one int8 code per element, the format the Mosaic GPU matmul takes.
`--transform=swiglu_hadamard` times a prefill's down_proj input: gate | up
[M, 2K] in, the kernel forming the SwiGLU as it loads
(`hadamard_quant(..., gate_up=True)`), against `swiglu_then_kernel` (XLA's
SwiGLU pass, then the same kernel: the model before) and the reference.
`--transform=rms_norm` times `rms_norm_quant` (a pre-norm's RMS norm and
quantize in one launch, the model's q/k/v and gate/up input) over the
`--block_elements` x `--num_warps` sweep against its reference.
`hbm_fraction` = (bytes read + written) / time / --peak_gbps. Times are GPU
kernel time where CUPTI gives it (`benchmarking.timed_ms`; records say
`timing`), else wall-clock medians. `matmul_share`
= ours / the W4A4 matmul the model runs after it (`w4a4_matmul.api` with
the backend it picks on this machine, N = K, the shape of
o_proj/down_proj-like linears), the paper's Fig. 7 overhead. Appends to
--out_dir/hadamard_quant.jsonl.

Decode (few rows): `--column_splits` sweeps the split path's G ("auto" is
the kernel's own choice, 1 the fused one-program-per-row kernel); configs
that run the same launch (G > 1 ignores rows_per_program; an explicit G is
capped) are timed once; each record's `sweep` holds every launch's ms (None:
failed), keyed w<num_warps>_<G>_<rows per program>_<chunk_elements>_<pN:
programs per SM of the persistent grid>_<sN: num_stages>_<mN: piece_multiple>
(None where they do not apply) or w<num_warps>_b<block_elements>. For example

  python -m experiments.bench_hadamard_quant --m=1,16 --k=11008,14336 \
      --transform=hadamard --packed=true,false --num_warps=2,4,8 \
      --column_splits=auto,1,2,4,8,16 --rows_per_program=1 \
      --chunk_elements=1024,2048,4096
"""

import math
import os
import shlex
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import benchmarking
from pallas_kernels import hadamard_quant as hq
from pallas_kernels import rms_norm_quant as rq
from pallas_kernels.w4a4_matmul import api as w4a4
from quarot_jax import qlinear

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_MS = flags.DEFINE_list("m", ["2048", "8192", "16384"], "Rows (tokens).")
_KS = flags.DEFINE_list("k", ["4096", "11008", "14336"], "Widths K.")
_PEAK = flags.DEFINE_float("peak_gbps", 3350.0, "HBM peak (H100 SXM).")
_WARPS = flags.DEFINE_list("num_warps", ["2", "4"], "num_warps sweep.")
_ROWS = flags.DEFINE_list("rows_per_program", ["1", "4", "8"],
                          "rows_per_program sweep (Hadamard kernel).")
_SPLITS = flags.DEFINE_list(
    "column_splits", ["auto", "1"],
    "column_splits sweep (Hadamard kernel): auto (None) or powers of two.")
_CHUNK = flags.DEFINE_list(
    "chunk_elements", ["2048"],
    "chunk_elements sweep (the split path's quantize at M <= 16).")
_PER_SM = flags.DEFINE_list(
    "programs_per_sm", ["auto"],
    "programs_per_sm sweep (Hadamard kernel): auto (None, the kernel's own"
    " choice), 0 a program per row block, n > 0 the persistent grid of n"
    " programs an SM looping over rows.")
_PIECES = flags.DEFINE_list(
    "piece_multiple", ["32"],
    "piece_multiple sweep (Hadamard kernel): 32 or 16.")
_STAGES = flags.DEFINE_list("num_stages", ["1"],
                            "num_stages sweep (Triton pipelining).")
_BLOCK = flags.DEFINE_list("block_elements", ["8192", "16384", "32768"],
                           "block_elements sweep (quantize-only kernel).")
_PACKED = flags.DEFINE_list("packed", ["true", "false"],
                            "Output formats: packed int4, int8 codes.")
_TRANSFORM = flags.DEFINE_list(
    "transform", ["hadamard", "quant_only"],
    "Variants: 'hadamard' (with the Hadamard), 'quant_only',"
    " 'swiglu_hadamard' (gate | up in, SwiGLU formed in the kernel) and"
    " 'rms_norm' (rms_norm_quant: the pre-norm and quantize).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "CPU smoke test.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  command = shlex.join(["python", "-m", "experiments.bench_hadamard_quant"]
                       + sys.argv[1:])
  key = iter(jax.random.split(jax.random.key(0), 1000))
  impl = dict(implementation="pallas", interpret=_INTERPRET.value)
  matmul_impl = dict(
      implementation=w4a4.default_implementation(
          interpret=_INTERPRET.value), interpret=_INTERPRET.value)
  splits = [None if g == "auto" else int(g) for g in _SPLITS.value]
  for k in map(int, _KS.value):
    base_k = qlinear.hadamard_base(k)  # closed over: a constant under jit
    order = base_k.shape[0]
    for m in map(int, _MS.value):
      records = []
      for transform, packed in [(t, p == "true") for t in _TRANSFORM.value
                                for p in _PACKED.value]:
        use_had = transform in ("hadamard", "swiglu_hadamard")
        gate_up = transform == "swiglu_hadamard"
        rms = transform == "rms_norm"
        norm_w = jax.random.uniform(next(key), (k,), jnp.bfloat16, 0.5, 1.5)
        x = jax.random.normal(next(key), (m, 2 * k if gate_up else k),
                              jnp.bfloat16)
        case = f"M{m}_K{k}_{transform}" + ("" if packed else "_int8")
        best = None
        sizes = ([dict(rows_per_program=int(r), column_splits=g,
                       chunk_elements=int(c),
                       programs_per_sm=None if n == "auto" else int(n),
                       num_stages=int(st), piece_multiple=int(pm))
                  for r in _ROWS.value for g in splits
                  for c in _CHUNK.value for n in _PER_SM.value
                  for st in _STAGES.value for pm in _PIECES.value]
                 if use_had else
                 [dict(block_elements=int(b)) for b in _BLOCK.value])
        seen = set()
        sweep = {}  # every launch's time, for the record
        for warps, size in [(w, z) for w in map(int, _WARPS.value)
                            for z in sizes]:
          cfg = hq.HadamardQuantConfig(num_warps=warps, **size)
          if use_had:  # the launch this config runs, timed once
            g = hq.column_splits(k, order, m, cfg)
            programs = hq.loop_programs(k, m, cfg) if g == 1 else 0
            launch = (warps, g, math.gcd(m, cfg.rows_per_program)
                      if g == 1 and not programs else None,
                      cfg.chunk_elements if g > 1 else None,
                      f"p{hq.programs_per_sm(k, cfg)}" if programs else None,
                      f"s{cfg.num_stages}",
                      f"m{cfg.piece_multiple}" if g == 1 else None)
            if launch in seen:
              continue
            seen.add(launch)
          name = f"w{warps}_" + ("_".join(map(str, launch[1:])) if use_had
                                 else f"b{cfg.block_elements}")
          fn = jax.jit(
              (lambda x, cfg=cfg, p=packed: rq.rms_norm_quant(
                  x, norm_w, eps=1e-5, packed=p, config=cfg, **impl)) if rms
              else (lambda x, cfg=cfg, h=use_had, p=packed, g=gate_up:
                    hq.hadamard_quant(x, base_k if h else None, packed=p,
                                      config=cfg, gate_up=g, **impl)))
          try:
            ms, how = benchmarking.timed_ms(fn, x)
          except Exception as e:  # pylint: disable=broad-except
            print(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
            sweep[name] = None
            continue
          print(f"  {cfg}: {ms:.4f} ms ({how['timing']})", flush=True)
          sweep[name] = round(ms, 4)
          if best is None or ms < best[0]:
            best = (ms, cfg, how)
        if best is None:
          continue
        ms, cfg, how = best
        xla = jax.jit(
            (lambda x, p=packed: rq.rms_norm_quant_reference(
                x, norm_w, eps=1e-5, packed=p)) if rms
            else (lambda x, h=use_had, p=packed, g=gate_up:
                  hq.hadamard_quant_reference(
                      x, base_k if h else None, packed=p, gate_up=g)))
        base = {"xla_unfused": benchmarking.timed_ms(xla, x)[0]}
        if gate_up:
          before = jax.jit(lambda x, p=packed, cfg=cfg: hq.hadamard_quant(
              hq.swiglu(*jnp.split(x, 2, axis=-1)), base_k, packed=p,
              config=cfg, **impl))
          base["swiglu_then_kernel"] = benchmarking.timed_ms(before, x)[0]
        wq = jax.random.randint(next(key), (k, k // 2), 0, 256, jnp.int32
                                ).astype(jnp.uint8)
        xq, sx = (rq.rms_norm_quant(x, norm_w, eps=1e-5, packed=packed,
                                    config=cfg, **impl) if rms
                  else hq.hadamard_quant(x, base_k if use_had else None,
                                         packed=packed, gate_up=gate_up,
                                         **impl))
        mm = jax.jit(lambda a, b, s, t: w4a4.w4a4_matmul(
            a, b, s, t, **matmul_impl))
        matmul_ms, _ = benchmarking.timed_ms(mm, xq, wq, sx,
                                             jnp.ones((k,), jnp.float32))
        # Read bf16; write the codes (int4 or int8) and the scales.
        moved = x.size * 2 + m * k // (2 if packed else 1) + m * 4
        records.append(benchmarking.record(
            "hadamard_quant", case, ms, base, command=command,
            hbm_fraction=round(moved / (ms * 1e-3) / (_PEAK.value * 1e9), 3),
            xla_hbm_fraction=round(moved / (base["xla_unfused"] * 1e-3)
                                   / (_PEAK.value * 1e9), 3),
            int4_matmul_ms=round(matmul_ms, 4),
            matmul_share=round(ms / matmul_ms, 3), config=str(cfg),
            column_splits=(hq.column_splits(k, order, m, cfg) if use_had
                           else None),
            sweep=sweep, timing=how["timing"], wall_ms=how["wall_ms"],
            matmul=matmul_impl["implementation"]))
        print(benchmarking.summary_line(records[-1]),
              f"hbm {records[-1]['hbm_fraction']:.2f}"
              f" share-of-matmul {records[-1]['matmul_share']:.2f}",
              flush=True)
      benchmarking.append_jsonl(os.path.join(_OUT.value,
                                             "hadamard_quant.jsonl"), records)


if __name__ == "__main__":
  app.run(main)
