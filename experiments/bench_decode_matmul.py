r"""4-bit decode matmul (`pallas_kernels.decode_matmul`) against XLA dots.

  python -m experiments.bench_decode_matmul --out=results/decode_matmul.jsonl
  python -m experiments.bench_decode_matmul --sweep  # Mosaic tile variants

For M in --ms and the (K, N) shapes of LLaMA-2-7B/13B linears, one process
times, side by side:
  mosaic       decode_matmul, Mosaic GPU kernel, bf16 x (W4A16)
  mosaic_w4a4  the same kernel fed int8 codes + per-token scales (W4A4)
  triton       decode_matmul, Triton kernel, bf16 x
  xla_bf16     XLA dot, bf16 x [M, K] · bf16 w [K, N] (the bf16 model)
  xla_int8     XLA int8 dot x [M, K] · w [N, K] -> int32, then the scales
  xla_int4     XLA dot of the int8 codes x with int4 w [N, K] (the packed
               bytes bitcast, no copy) -> int32, then the scales: whether
               XLA's own int4 handling reads 4-bit weights at bandwidth
               (W4A4, bit-exact like ours)
  xla_int4_bf16  the same int4 w against bf16 x, f32 accumulation (W4A16)
  xla_g128     W4A16 with group-128 scales as the packed model runs it
               (`qlinear.linear`: one XLA dot per group on the int4 values)
  xla_g128_f32 the same product as the model ran it before 2026-12-06
               (the weights dequantized to f32[N, K], then one f32 dot)
Each jitted call runs the op on --buffers different weight matrices (as a
decode step runs one per layer), so no matrix is in the 50 MB L2 when its
turn comes. Two times per op call: `ms` is device time, the sum of the
durations of the kernels the call launches (CUPTI, through
`jax.experimental.mosaic.gpu.profiler`; median over iterations), and
`wall_ms` the host-clock time per call of back-to-back jitted calls
(launch gaps included). `kernel_ms` is the op's longest kernel alone (the
decode_matmul kernel, or the XLA dot's; the rest of `ms` is the wrapper's
pad and epilogue fusions). GB/s and
`hbm_fraction` (÷ 4.8 TB/s, the H200's HBM) count the bytes each op must
move: weights (int4 + f32 scales, or bf16, or int8) + x + y. Before timing,
every kernel config is checked against `decode_matmul_reference` (W4A4:
bit-exact). --sweep first times the Mosaic variants of SWEEP on
--sweep_cases x --sweep_ms, then runs the table with the fastest W4A16 and
W4A4 variants (each record carries its `config`). Appends one JSONL record
per (case, M, implementation).
"""

import datetime
import json
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import benchmarking
from pallas_kernels import decode_matmul as dm
from pallas_kernels import int4_layout
from quarot_jax import qlinear

SHAPES = {  # case -> (K, N)
    "7b_qkv": (4096, 12288), "7b_o": (4096, 4096), "7b_up": (4096, 11008),
    "7b_down": (11008, 4096), "13b_up": (5120, 13824),
    "13b_down": (13824, 5120),
}
HBM_BYTES_PER_S = 4.8e12

_OUT = flags.DEFINE_string("out", "results/decode_matmul.jsonl",
                           "JSONL file the records are appended to.")
_CASES = flags.DEFINE_list("cases", list(SHAPES), "Shapes to time.")
_MS = flags.DEFINE_list("ms", ["1", "4", "16"], "Token counts M.")
_IMPLS = flags.DEFINE_list(
    "impls", ["mosaic", "mosaic_w4a4", "triton", "xla_bf16", "xla_int8",
              "xla_int4", "xla_int4_bf16"],
    "Implementations to time.")
_BUFFERS = flags.DEFINE_integer(
    "buffers", 0, "Weight matrices per timed call; 0 = enough for >= 100 MB"
    " of int4 weights (4 to 16).")
_SWEEP = flags.DEFINE_bool("sweep", False,
                           "Also time Mosaic tile variants (SWEEP).")
_SWEEP_CASES = flags.DEFINE_list("sweep_cases", ["7b_qkv", "7b_down"],
                                 "Cases of the sweep.")
_SWEEP_MS = flags.DEFINE_list("sweep_ms", ["1", "16"], "M of the sweep.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "CPU smoke run: Triton kernel in interpret mode.")

# name -> config of the Mosaic variants timed by --sweep. Round 1 (H200,
# 2026-11-30) timed w_layout='wgmma', block_n 64/256, block_k 128/512,
# num_stages 2/6, programs_per_sm 1/4 and int4[N, K] weights handed in: all
# within -12%..+3% of the default. Round 2 asks whether more resident
# programs per SM (less shared memory each) or the int8 MMA help.
Cfg = dm.DecodeMatmulConfig
SWEEP = {
    "mosaic_bn64_s3_p4": Cfg(block_n=64, num_stages=3, programs_per_sm=4),
    "mosaic_bn64_bk128_p6": Cfg(block_n=64, block_k=128, programs_per_sm=6),
    "mosaic_bk128_s3_p4": Cfg(block_k=128, num_stages=3, programs_per_sm=4),
    "mosaic_s2_p4": Cfg(num_stages=2, programs_per_sm=4),
    "mosaic_bn64_bk64_p8": Cfg(block_n=64, block_k=64, num_stages=6,
                               programs_per_sm=8),
    "mosaic_w4a4_int8": Cfg(w4a4_mma="int8"),
    "mosaic_w4a4_int8_bn64_s3_p4": Cfg(w4a4_mma="int8", block_n=64,
                                       num_stages=3, programs_per_sm=4),
    "mosaic_w4a4_int8_bk128_s3_p4": Cfg(w4a4_mma="int8", block_k=128,
                                        num_stages=3, programs_per_sm=4),
    # Round 3 (#14): can one program per 64 weight rows (no split over K,
    # so no partial sums for an epilogue kernel to add) keep HBM busy with
    # a deep pipeline? Compare their kernel_ms with the default's ms.
    "mosaic_w4a4_int8_split1_s4": Cfg(w4a4_mma="int8", block_n=64,
                                      split_k=1, num_stages=4),
    "mosaic_w4a4_int8_split1_s8": Cfg(w4a4_mma="int8", block_n=64,
                                      split_k=1, num_stages=8),
    "mosaic_w4a4_int8_split1_s12": Cfg(w4a4_mma="int8", block_n=64,
                                       split_k=1, num_stages=12),
    "mosaic_w4a4_int8_split1_bk512_s6": Cfg(w4a4_mma="int8", block_n=64,
                                            block_k=512, split_k=1,
                                            num_stages=6),
    "mosaic_w4a4_int8_split2_s8": Cfg(w4a4_mma="int8", block_n=64,
                                      split_k=2, num_stages=8),
    # Round 4 (#14): a producer warpgroup for the TMA copies.
    "mosaic_w4a4_ws_s3_p4": Cfg(w4a4_mma="int8", block_n=64, num_stages=3,
                                programs_per_sm=4, warp_specialized=True),
    "mosaic_w4a4_ws_s4_p2": Cfg(w4a4_mma="int8", block_n=64, num_stages=4,
                                programs_per_sm=2, warp_specialized=True),
    "mosaic_w4a4_ws_bn128_s4_p2": Cfg(w4a4_mma="int8", block_n=128,
                                      num_stages=4, programs_per_sm=2,
                                      warp_specialized=True),
    "mosaic_ws_s3_p4": Cfg(block_n=64, num_stages=3, programs_per_sm=4,
                           warp_specialized=True),
}
# Configs of the table's implementations (--sweep replaces them with the
# fastest variant of the sweep).
CONFIGS = {"mosaic": dm.default_decode_matmul_config("mosaic"),
           "mosaic_w4a4": dm.default_decode_matmul_config("mosaic"),
           "triton": dm.default_decode_matmul_config("triton")}


def is_w4a4(impl: str) -> bool:
  return impl.startswith("mosaic_w4a4") or impl in ("xla_int8", "xla_int4")


def is_baseline(impl: str) -> bool:
  """XLA's dots of other weight formats: timed, not checked against ours."""
  return impl in ("xla_bf16", "xla_int8")


def as_int4(w_q: jax.Array) -> jax.Array:
  """uint8[N, K // 2] packed bytes as int4[N, K] (low nibble first, the
  `int4_layout` order; a bitcast, no copy)."""
  return jax.lax.bitcast_convert_type(w_q, jnp.int4).reshape(
      w_q.shape[0], -1)


def make_operands(key: jax.Array, m: int, k: int, n: int, buffers: int
                  ) -> dict[str, Any]:
  """Random operands: `buffers` weight matrices per weight format."""
  keys = jax.random.split(key, 3 * buffers + 3)
  codes = [jax.random.randint(keys[i], (n, k), -8, 8, jnp.int8)
           for i in range(buffers)]
  s_w = [jax.random.uniform(keys[buffers + i], (n,), jnp.float32, 0.5, 2.0)
         / 64 for i in range(buffers)]
  x = jax.random.normal(keys[-1], (m, k), jnp.float32)
  x_codes = jax.random.randint(keys[-2], (m, k), -8, 8, jnp.int8)
  return {
      "w_q": [int4_layout.pack_int4(c) for c in codes],
      "w_int8": codes,  # [N, K]
      "s_w": s_w,
      "x": x.astype(jnp.bfloat16),
      "x_codes": x_codes,
      "s_x": jax.random.uniform(keys[-3], (m,), jnp.float32, 0.5, 2.0),
  }


def op_fn(impl: str, cfg: dm.DecodeMatmulConfig | None, interpret: bool
          ) -> Callable[..., jax.Array]:
  """One op call: (x, x_codes, s_x, w, s_w) -> y bf16[M, N]."""
  if impl == "xla_bf16":
    return lambda x, xc, sx, w, sw: jnp.dot(x, w)
  if impl in ("xla_int8", "xla_int4"):  # w int8 or int4 [N, K]
    def int8(x, xc, sx, w, sw):
      acc = jax.lax.dot_general(xc, w, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.int32)
      return (acc.astype(jnp.float32) * sx[:, None] * sw[None, :]
              ).astype(jnp.bfloat16)
    return int8
  if impl in ("xla_g128", "xla_g128_f32"):
    # Group-128 scales [N, K / 128], each group the channel's scale, so the
    # per-channel reference checks them.
    def grouped(x, xc, sx, w, sw):
      sw = jnp.broadcast_to(sw[:, None], (w.shape[0], 2 * w.shape[1] // 128))
      p = {"qweight": w, "wscale": sw}
      if impl == "xla_g128":
        return qlinear.linear(x, p, a_spec=None, online_hadamard=False)
      wf = qlinear.dequantize_weight(p)  # f32[N, K]
      return jax.lax.dot_general(
          x.astype(jnp.float32), wf, (((1,), (1,)), ((), ())),
          preferred_element_type=jnp.float32).astype(x.dtype)
    return grouped
  if impl == "xla_int4_bf16":
    def int4_bf16(x, xc, sx, w, sw):
      acc = jax.lax.dot_general(x, w.astype(jnp.bfloat16),
                                (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
      return (acc * sw[None, :]).astype(jnp.bfloat16)
    return int4_bf16
  backend = "triton" if impl == "triton" else "mosaic"
  if is_w4a4(impl):
    return lambda x, xc, sx, w, sw: dm.decode_matmul(
        xc, w, sw, sx, config=cfg, implementation=backend)
  return lambda x, xc, sx, w, sw: dm.decode_matmul(
      x, w, sw, config=cfg, implementation=backend, interpret=interpret)


def weights_for(impl: str, ops: dict[str, Any]) -> list[jax.Array]:
  if impl == "xla_bf16":  # [K, N], as the bf16 model stores kernels
    return [c.T.astype(jnp.bfloat16) for c in ops["w_int8"]]
  if impl == "xla_int8":
    return ops["w_int8"]
  if impl in ("xla_int4", "xla_int4_bf16"):
    return [as_int4(w) for w in ops["w_q"]]
  return ops["w_q"]


def op_bytes(impl: str, m: int, k: int, n: int) -> int:
  """Bytes the op must move: weights (+ scales) + x + y."""
  y = 2 * m * n
  if impl == "xla_bf16":
    return 2 * n * k + 2 * m * k + y
  if is_w4a4(impl):
    w = n * k if impl == "xla_int8" else n * k // 2 + 4 * n
    return w + 4 * n + m * k + 4 * m + y
  return n * k // 2 + 4 * n + 2 * m * k + y


def check(impl: str, fn, ops: dict[str, Any], w: jax.Array) -> str:
  """Max relative error vs the reference (W4A4: count of unequal y)."""
  y = jax.jit(fn)(ops["x"], ops["x_codes"], ops["s_x"], w, ops["s_w"][0])
  if is_w4a4(impl):
    ref = dm.decode_matmul_reference(ops["x_codes"], ops["w_q"][0],
                                     ops["s_w"][0], ops["s_x"])
    bad = int(jnp.sum(y != ref))
    if bad:
      raise AssertionError(f"{impl}: {bad} of {y.size} outputs differ from"
                           " the int32 reference")
    return "bit-exact"
  ref = dm.decode_matmul_reference(ops["x"], ops["w_q"][0], ops["s_w"][0],
                                   out_dtype=jnp.float32)
  err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref)
              / jnp.linalg.norm(ref))
  if not err < 1e-2:
    raise AssertionError(f"{impl}: relative error {err:.3g} vs reference")
  return f"rel_err={err:.2e}"


def time_op(fn, ops: dict[str, Any], ws: list[jax.Array], *, reps: int = 10,
            runs: int = 15) -> dict[str, float]:
  """Device and wall time per op call over the weight buffers."""
  calls = len(ws)
  many = jax.jit(lambda x, xc, sx, ws, sws: [
      fn(x, xc, sx, w, sw) for w, sw in zip(ws, sws)])
  args = (ops["x"], ops["x_codes"], ops["s_x"], ws, ops["s_w"][:calls])
  jax.block_until_ready(many(*args))
  walls = []
  for _ in range(runs):
    start = time.perf_counter()
    for _ in range(reps):
      out = many(*args)
    jax.block_until_ready(out)
    walls.append((time.perf_counter() - start) * 1e3 / reps / calls)
  result = {"wall_ms": statistics.median(walls)}
  timings = benchmarking.kernel_timings(many, *args, iterations=7)
  if timings is None:
    result["ms"] = result["wall_ms"]
    return result
  totals = [sum(t for _, t in it) / calls for it in timings]
  top = max(timings[0], key=lambda nt: nt[1])[0]  # the matmul's kernel
  ours = [sum(t for name, t in it if name == top) / calls for it in timings]
  result["ms"] = statistics.median(totals)
  result["kernel_ms"] = statistics.median(ours)
  result["kernels"] = sorted({name for it in timings for name, _ in it})
  return result


def run_case(case: str, m: int, impls: list[str], *, buffers: int,
             interpret: bool, command: str) -> list[dict[str, Any]]:
  """Checks and times every implementation for one (case, M)."""
  k, n = SHAPES[case]
  ops = make_operands(jax.random.key(m * 7 + k + n), m, k, n, buffers)
  records = []
  for impl in impls:
    cfg = SWEEP.get(impl) or CONFIGS.get(impl)
    fn = op_fn(impl, cfg, interpret)
    ws = weights_for(impl, ops)
    try:
      status = "baseline" if is_baseline(impl) else check(
          impl, fn, ops, ws[0])
      t = time_op(fn, ops, ws)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{case} M={m} {impl}: FAILED {type(e).__name__}: {e}"[:2000])
      continue
    nbytes = op_bytes(impl, m, k, n)
    rec = {
        "case": case, "M": m, "K": k, "N": n, "implementation": impl,
        "config": repr(cfg) if cfg else None, "check": status,
        "ms": round(t["ms"], 5), "wall_ms": round(t["wall_ms"], 5),
        "kernel_ms": round(t["kernel_ms"], 5) if "kernel_ms" in t else None,
        "bytes": nbytes,
        "gbps": round(nbytes / t["ms"] / 1e6, 1),
        "hbm_fraction": round(nbytes / (t["ms"] * 1e-3) / HBM_BYTES_PER_S, 3),
        "hbm_fraction_wall": round(
            nbytes / (t["wall_ms"] * 1e-3) / HBM_BYTES_PER_S, 3),
        "kernels": t.get("kernels"), "buffers": buffers,
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(), "command": command,
    }
    if rec["kernel_ms"]:
      rec["kernel_hbm_fraction"] = round(
          nbytes / (rec["kernel_ms"] * 1e-3) / HBM_BYTES_PER_S, 3)
    records.append(rec)
    print(f"{case:9} M={m:<3} {impl:20} {rec['ms'] * 1e3:8.2f} us"
          f" {rec['gbps']:7.0f} GB/s hbm {rec['hbm_fraction']:.2f}"
          f" (kernel {rec.get('kernel_hbm_fraction') or 0:.2f},"
          f" wall {rec['hbm_fraction_wall']:.2f}) {status}", flush=True)
  base = {r["implementation"]: r["ms"] for r in records
          if is_baseline(r["implementation"])}
  for r in records:
    r["speedup"] = {b: round(ms / r["ms"], 3) for b, ms in base.items()}
  return records


def pick_best(records: list[dict[str, Any]]) -> None:
  """Points CONFIGS' mosaic entries at the sweep's fastest variants (total
  ms over the sweep's cases; the default config competes too)."""
  for table_impl, w4a4 in (("mosaic", False), ("mosaic_w4a4", True)):
    totals: dict[str, float] = {}
    for r in records:
      impl = r["implementation"]
      if (impl == table_impl or impl in SWEEP) and is_w4a4(impl) == w4a4:
        totals[impl] = totals.get(impl, 0.0) + r["ms"]
    if totals:
      best = min(totals, key=totals.get)
      CONFIGS[table_impl] = SWEEP.get(best) or CONFIGS[table_impl]
      print(f"{table_impl}: fastest in the sweep is {best} {totals}")


def run(cases, ms, impls, *, command: str, sweep: bool = False
        ) -> list[dict[str, Any]]:
  """The table (after the sweep, with its best configs); appends JSONL."""
  jobs = [(c, m, list(impls)) for c in cases for m in ms]
  if sweep:
    jobs = [(c, m, ["mosaic", "mosaic_w4a4", *SWEEP])
            for c in _SWEEP_CASES.value for m in map(int, _SWEEP_MS.value)
            ] + [None] + jobs
  records: list[dict[str, Any]] = []
  for job in jobs:
    if job is None:
      pick_best(records)
      continue
    case, m, job_impls = job
    k, n = SHAPES[case]
    buffers = _BUFFERS.value or min(16, max(4, -(-10**8 // (n * k // 2))))
    recs = run_case(case, m, job_impls, buffers=buffers,
                    interpret=_INTERPRET.value, command=command)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "a") as f:
      for r in recs:
        f.write(json.dumps(r) + "\n")
    records += recs
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  command = "python -m experiments.bench_decode_matmul " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  records = run(_CASES.value, list(map(int, _MS.value)), _IMPLS.value,
                command=command, sweep=_SWEEP.value)
  print(f"{len(records)} records appended to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
