r"""W4A4 (Triton and Mosaic GPU) and W4A16 matmuls against XLA bf16 and int8.

  python -m experiments.bench_int4_matmul --out_dir=results
  python -m experiments.bench_int4_matmul --variants=mosaic  # one kernel

W4A4 records carry `implementation`: `triton` (w4a4_matmul_triton);
`triton_g128` (the same with s_x [M, K/128] and s_w [N, K/128], the 128G
mode); `mosaic_gpu` (w4a4_matmul_mosaic: packed int4 activations and
weights, both widened to int8 inside the kernel); `mosaic_gpu_x_int8`
(activations handed over as int8, fed to the wgmma from shared memory: what
the model runs); `mosaic_gpu_w8` and `mosaic_gpu_w8_x_int8` (the diagnostic
w4a4_matmul_mosaic_w8: weights widened to int8 once, at load, at twice the
weight memory). `--variants=mosaic_wt` times w4a4_matmul_mosaic_wt (the
weights as the register operand, y stored through an in-register
transpose; `mosaic_gpu_wt`), the same storing yᵀ (`mosaic_gpu_wt_yt`), then
the model's use of each: `residual + y` (`mosaic_gpu_x_int8_add`,
`mosaic_gpu_wt_add`) against `residual + yᵀ.T` (`mosaic_gpu_wt_yt_add`, the
transpose fused into the add) and the residual added in the kernel's
epilogue (`mosaic_gpu_wt_epilogue_add`, what o_proj and down_proj run at
prefill; all four checked equal). `--variants=mosaic_wt_g128` times the wt
kernel with group-128 scales on both sides (`mosaic_gpu_wt_g128`; each
config checked against the reference first), `mosaic_wt_g128w` with
group-128 weight scales and per-token activation scales (`mosaic_gpu_wt_g128w`,
the model's 128G mode: `QuaRotConfig(w_groupsize=128)`).

W4A16 (decode) runs each matmul over --decode_layers different weight
matrices in one jitted call, as a decode step runs one per layer, and
reports the time per matmul: single calls of these 10-100 µs matmuls time
the host's dispatch, not the GPU. --decode_timing=map (default) runs a
`lax.map` over [layers, ...] stacked weights; --decode_timing=unrolled
passes `layers` separate weight arrays (and activations) and calls the
matmul once per layer in a Python loop unrolled in the trace, so no layer's
weights are sliced out of a stack. Each W4A16 config is checked against the
reference before it is timed. --interpret runs the W4A16 kernel in
interpret mode (CPU smoke runs only; the timings mean nothing).

Each case is timed side by side in one process (median of 20 runs after
warm-up, fresh random inputs). Appends JSONL to --out_dir.
"""

import functools
import shlex
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import benchmarking
from pallas_kernels import w4a16_matmul as w4a16
from pallas_kernels.w4a4_matmul import mosaic_gpu as mgpu
from pallas_kernels.w4a4_matmul import reference as w4a4_reference
from pallas_kernels.w4a4_matmul import triton as w4a4_triton

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_MS = flags.DEFINE_list("m", ["2048", "8192", "32768"], "W4A4 token counts.")
_KN = flags.DEFINE_list("kn", ["4096x4096", "4096x11008", "11008x4096",
                               "5120x13824", "13824x5120"], "K x N shapes.")
_DECODE_M = flags.DEFINE_list("decode_m", ["1", "4", "16"], "W4A16 M.")
_LAYERS = flags.DEFINE_integer(
    "decode_layers", 32, "W4A16: weight matrices per timed call.")
_DECODE_TIMING = flags.DEFINE_enum(
    "decode_timing", "map", ["map", "unrolled"],
    "W4A16: lax.map over stacked weights, or one call per separate weight"
    " array unrolled in the trace.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "W4A16 kernel in interpret mode (CPU smoke runs).")
# Not `--kernels`: that flag means one `kernels.resolve` setting elsewhere.
_VARIANTS = flags.DEFINE_list(
    "variants", ["triton", "triton_g128", "mosaic", "w4a16"],
    "Which of triton, triton_g128 (group-128 scales), mosaic, mosaic_wt"
    " (weights as the register operand), mosaic_wt_g128 (the same with"
    " group-128 scales on both sides), mosaic_wt_g128w (group-128 weight"
    " scales, per-token activation scales: the model's 128G mode), w4a16"
    " to time.")

_WT_SWEEP = flags.DEFINE_bool(
    "wt_sweep", True, "mosaic_wt: time every config in _MOSAIC_WT_CONFIGS"
    " (false: the default tiles only).")
_WT_EXTRAS = flags.DEFINE_bool(
    "wt_extras", True, "mosaic_wt: also time the kernel the model ran"
    " before, the yᵀ layout and the residual adds (false: the kernel alone).")

_W4A4_CONFIGS = (
    w4a4_triton.W4A4TritonConfig(block_m=128, block_n=128, block_k=64,
                                 num_warps=4, num_stages=3),
    w4a4_triton.W4A4TritonConfig(block_m=128, block_n=256, block_k=64,
                                 num_warps=8, num_stages=3),
    w4a4_triton.W4A4TritonConfig(block_m=256, block_n=128, block_k=64,
                                 num_warps=8, num_stages=3),
)
_MOSAIC_CONFIGS = (  # None: default_w4a4_mosaic_config.
    None,
    mgpu.W4A4MosaicConfig(wg_dimension="m", grid_minor_dim="m"),
)
_MOSAIC_X_INT8_CONFIGS = (
    None,
    mgpu.W4A4MosaicConfig(wgmma_depth=1, max_concurrent_steps=2),
    mgpu.W4A4MosaicConfig(wg_dimension="m", grid_minor_dim="m",
                          wgmma_depth=1, max_concurrent_steps=3),
)
_MOSAIC_WT_CONFIGS = (  # tiles of yᵀ [N, M]: block_m along N.
    None,  # `default_w4a4_mosaic_wt_config`
    mgpu.W4A4MosaicConfig(wg_dimension="m", grid_minor_dim="m"),
    mgpu.W4A4MosaicConfig(wg_dimension="m", grid_minor_dim="n"),
    mgpu.W4A4MosaicConfig(wg_dimension="m", block_k=256,
                          max_concurrent_steps=2),
    # 256-token tiles (None, the default, has them with 256-wide K steps;
    # wg_dimension='n' at these tiles overflows shared memory: 314432 B).
    mgpu.W4A4MosaicConfig(wg_dimension="m", block_m=64, block_n=256),
)
_G128 = functools.partial(mgpu.W4A4MosaicConfig, wg_dimension="m",
                          block_m=64, block_n=128, max_concurrent_steps=4)
_MOSAIC_WT_G128_CONFIGS = (  # one 128-wide K group per pipeline step
    None,  # `default_w4a4_mosaic_wt_grouped_config`: 128 tokens, 4 deep,
    # each group added under the next one's wgmma, converted by bits
    _G128(group_convert="cvt"),  # the quarter-rate I2F conversion
    _G128(group_overlap=False),  # each group added after its wgmma
    _G128(group_overlap=True, grid_minor_dim="m"),
)
_W4A16_CONFIGS = (
    w4a16.W4A16MatmulConfig(block_m=16, block_n=64, block_k=256,
                            num_warps=4, num_stages=4),
    w4a16.W4A16MatmulConfig(block_m=16, block_n=64, block_k=256,
                            split_k=4, num_warps=4, num_stages=4),
    w4a16.W4A16MatmulConfig(block_m=16, block_n=32, block_k=256,
                            split_k=8, num_warps=4, num_stages=3),
    w4a16.W4A16MatmulConfig(block_m=16, block_n=128, block_k=128,
                            split_k=4, num_warps=4, num_stages=4),
)
_NT = (((1,), (1,)), ((), ()))


def _bf16_mm(x, w):
  return jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32
                             ).astype(jnp.bfloat16)


def _int8_mm(x, w):
  return jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.int32)


def _bf16_close(got, want) -> bool:
  """True when bf16 outputs agree up to bf16 rounding (either may round
  the other way) and f32 summation order."""
  got, want = (jnp.stack(a) if isinstance(a, (list, tuple)) else a
               for a in (got, want))
  want = want.astype(jnp.float32)
  return bool(jnp.allclose(got.astype(jnp.float32), want, rtol=2.0**-7,
                           atol=1e-4 * float(jnp.abs(want).max())))


def _best(fn_for_config, configs, want=None, close_to=None):
  """(ms, config) of the fastest config that compiles (and equals `want`,
  or is `_bf16_close` to `close_to`)."""
  best = None
  for cfg in configs:
    try:
      fn = fn_for_config(cfg)
      if want is not None and not bool(jnp.array_equal(fn(), want)):
        print(f"  {cfg}: WRONG RESULT, not timed")
        continue
      if close_to is not None and not _bf16_close(fn(), close_to):
        print(f"  {cfg}: WRONG RESULT, not timed")
        continue
      ms = benchmarking.median_ms(fn)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    print(f"  {cfg}: {ms:.4f} ms")
    if best is None or ms < best[0]:
      best = (ms, cfg)
  return best


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  command = shlex.join(["python", "-m", "experiments.bench_int4_matmul"]
                       + sys.argv[1:])
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  variants = set(_VARIANTS.value)
  records = []
  for kn in _KN.value:
    k, n = map(int, kn.split("x"))
    if variants & {"triton", "triton_g128", "mosaic", "mosaic_wt",
                   "mosaic_wt_g128", "mosaic_wt_g128w"}:
      for m in map(int, _MS.value):
        records += _w4a4_case(m, k, n, keys, variants, command)
    if "w4a16" in variants:
      for m in map(int, _DECODE_M.value):
        records += _w4a16_case(m, k, n, keys, command)
  for name in ("int4_matmul", "w4a16_matmul"):
    benchmarking.append_jsonl(f"{_OUT.value}/{name}.jsonl",
                              [r for r in records if r["benchmark"] == name])


def _rint(keys, shape) -> jax.Array:
  """Random packed int4 bytes, uint8[shape]."""
  return jax.random.randint(next(keys), shape, 0, 256, jnp.int32
                            ).astype(jnp.uint8)


def _scales(keys, shape) -> jax.Array:
  return jax.random.uniform(next(keys), shape, jnp.float32, 0.01, 0.1)


def _w4a4_case(m: int, k: int, n: int, keys, variants: set[str],
               command: str) -> list[dict]:
  """One W4A4 shape: every asked variant's best config against XLA bf16 and
  int8 ([N, K] weights), each checked against the exact reference first."""
  xq, wq = _rint(keys, (m, k // 2)), _rint(keys, (n, k // 2))
  sx, sw = _scales(keys, (m,)), _scales(keys, (n,))
  xb = jax.random.normal(next(keys), (m, k), jnp.bfloat16)
  wb = jax.random.normal(next(keys), (n, k), jnp.bfloat16)
  xi = jax.random.randint(next(keys), (m, k), -128, 127, jnp.int8)
  wi = jax.random.randint(next(keys), (n, k), -128, 127, jnp.int8)
  case = f"M{m}_K{k}_N{n}"
  print(case, flush=True)
  base = {"xla_bf16": benchmarking.median_ms(jax.jit(_bf16_mm), xb, wb),
          "xla_int8": benchmarking.median_ms(jax.jit(_int8_mm), xi, wi)}
  want = w4a4_reference.w4a4_matmul_reference(xq, wq, sx, sw)  # Exact.
  candidates = []  # (implementation, best (ms, config) or None)
  if "triton" in variants:
    candidates.append(("triton", _best(
        lambda c: _bind(w4a4_triton.w4a4_matmul_triton, (xq, wq, sx, sw), c),
        _W4A4_CONFIGS, want)))
  if "triton_g128" in variants:
    gx, gw = _scales(keys, (m, k // 128)), _scales(keys, (n, k // 128))
    got = w4a4_triton.w4a4_matmul_triton(xq, wq, gx, gw,
                                         out_dtype=jnp.float32)
    ref = w4a4_reference.w4a4_matmul_reference(xq, wq, gx, gw,
                                               out_dtype=jnp.float32)
    if not bool(jnp.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(
        jnp.abs(ref).max()))):
      print("  triton_g128: WRONG RESULT, not timed")
    else:
      candidates.append(("triton_g128", _best(
          lambda c: _bind(w4a4_triton.w4a4_matmul_triton, (xq, wq, gx, gw),
                          c),
          _W4A4_CONFIGS)))
  if "mosaic_wt_g128" in variants:
    candidates.append(("mosaic_gpu_wt_g128", _mosaic_wt_g128(xq, wq, keys)))
  if "mosaic_wt_g128w" in variants:
    candidates.append(("mosaic_gpu_wt_g128w",
                       _mosaic_wt_g128(xq, wq, keys, per_token_x=True)))
  if "mosaic" in variants:
    w8, x8 = mgpu.unpack_weights(wq), mgpu.unpack_weights(xq)
    for name, op, args, configs in (
        ("mosaic_gpu", mgpu.w4a4_matmul_mosaic, (xq, wq), _MOSAIC_CONFIGS),
        ("mosaic_gpu_x_int8", mgpu.w4a4_matmul_mosaic, (x8, wq),
         _MOSAIC_X_INT8_CONFIGS),
        ("mosaic_gpu_w8", mgpu.w4a4_matmul_mosaic_w8, (xq, w8),
         _MOSAIC_CONFIGS),
        ("mosaic_gpu_w8_x_int8", mgpu.w4a4_matmul_mosaic_w8, (x8, w8),
         _MOSAIC_X_INT8_CONFIGS)):
      candidates.append((name, _best(
          lambda c, op=op, args=args: _bind(op, (*args, sx, sw), c),
          configs, want)))
  if "mosaic_wt" in variants:
    candidates += _mosaic_wt(xq, wq, sx, sw, want)
  records = []
  for implementation, best in candidates:
    if best is None:
      continue
    ms, cfg = best
    tops = 2 * m * n * k / ms / 1e9
    records.append(benchmarking.record(
        "int4_matmul", case, ms, base, command=command,
        implementation=implementation, ours_tops=round(tops, 1),
        config=str(cfg)))
    print(f"  -> {implementation} {ms:.4f} ms ({tops:.0f} TOP/s) bf16"
          f" {base['xla_bf16']:.4f} int8 {base['xla_int8']:.4f}", flush=True)
  return records


def _mosaic_wt_g128(xq, wq, keys, per_token_x: bool = False
                    ) -> tuple | None:
  """The wt kernel with group-128 scales on both sides (`per_token_x`:
  on the weights only): checked in f32 against the reference (up to f32
  rounding), then each config timed with bf16 out (checked
  `_bf16_close`)."""
  m, k = xq.shape[0], 2 * xq.shape[1]
  gx = _scales(keys, (m,) if per_token_x else (m, k // 128))
  gw = _scales(keys, (wq.shape[0], k // 128))
  x8 = mgpu.unpack_weights(xq)
  got = mgpu.w4a4_matmul_mosaic_wt(x8, wq, gx, gw, out_dtype=jnp.float32)
  ref = w4a4_reference.w4a4_matmul_reference(xq, wq, gx, gw,
                                             out_dtype=jnp.float32)
  if not bool(jnp.allclose(got, ref, rtol=1e-5,
                           atol=1e-5 * float(jnp.abs(ref).max()))):
    print("  mosaic_wt_g128: WRONG RESULT, not timed")
    return None
  return _best(
      lambda c: _bind(mgpu.w4a4_matmul_mosaic_wt, (x8, wq, gx, gw), c),
      _MOSAIC_WT_G128_CONFIGS if _WT_SWEEP.value else (None,),
      close_to=ref.astype(jnp.bfloat16))


def _mosaic_wt(xq, wq, sx, sw, want) -> list[tuple[str, tuple | None]]:
  """w4a4_matmul_mosaic_wt alone (y, checked), the same with yᵀ stored as
  computed (checked: yᵀ.T == y), then the Mosaic kernels as the model used
  them, a residual added to y (all four ways checked equal)."""
  x8 = mgpu.unpack_weights(xq)  # int8 codes, what the model hands over
  best_wt = _best(
      lambda c: _bind(mgpu.w4a4_matmul_mosaic_wt, (x8, wq, sx, sw), c),
      _MOSAIC_WT_CONFIGS if _WT_SWEEP.value else (None,), want)
  if not _WT_EXTRAS.value:
    return [("mosaic_gpu_wt", best_wt)]
  found = [("mosaic_gpu_wt", best_wt),  # and the model's kernel, as it runs
            ("mosaic_gpu_x_int8_model", _best(
                lambda c: _bind(mgpu.w4a4_matmul_mosaic, (x8, wq, sx, sw), c),
                (None,), want))]
  if best_wt is None:
    return found
  cfg = best_wt[1]
  found.append(("mosaic_gpu_wt_yt", _best(
      lambda c: _bind(mgpu.w4a4_matmul_mosaic_wt, (x8, wq, sx, sw), c,
                      transposed=True), (cfg,), want.T)))
  r = jax.random.normal(jax.random.key(7), want.shape, jnp.bfloat16)
  adds = {
      "mosaic_gpu_x_int8_add": jax.jit(
          lambda x8, wq, sx, sw, r: r + mgpu.w4a4_matmul_mosaic(
              x8, wq, sx, sw)),
      "mosaic_gpu_wt_yt_add": jax.jit(
          lambda x8, wq, sx, sw, r: r + mgpu.w4a4_matmul_mosaic_wt(
              x8, wq, sx, sw, config=cfg, transposed=True).T),
      "mosaic_gpu_wt_add": jax.jit(
          lambda x8, wq, sx, sw, r: r + mgpu.w4a4_matmul_mosaic_wt(
              x8, wq, sx, sw, config=cfg)),
      # The model's since 2026-12-05: the add in the kernel's epilogue
      # (its default config for a residual).
      "mosaic_gpu_wt_epilogue_add": jax.jit(
          lambda x8, wq, sx, sw, r: mgpu.w4a4_matmul_mosaic_wt(
              x8, wq, sx, sw, residual=r))}
  args = (x8, wq, sx, sw, r)
  outs = [fn(*args) for fn in adds.values()]
  same = all(bool(jnp.array_equal(outs[0], o)) for o in outs[1:])
  print(f"  residual + y: the four ways equal: {same}")
  if same:
    for name, fn in adds.items():
      ms = benchmarking.median_ms(fn, *args)
      print(f"  {name}: {ms:.4f} ms")
      found.append((name, (ms, cfg if "wt" in name else None)))
  return found


def _w4a16_case(m: int, k: int, n: int, keys, command: str) -> list[dict]:
  """One W4A16 decode shape over `--decode_layers` weight matrices (see the
  module docstring), the best config against XLA bf16, per matmul."""
  layers, timing = _LAYERS.value, _DECODE_TIMING.value
  rnd = lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)
  if timing == "map":  # One x; [layers, ...] weight stacks.
    over_layers = _over_layers
    x = rnd((m, k))
    wq, sw = _rint(keys, (layers, n, k // 2)), _scales(keys, (layers, n))
    wb = rnd((layers, n, k))
  else:  # Per-layer lists: x, w_q and s_w as a decode step sees them.
    over_layers = _unrolled
    x = [rnd((m, k)) for _ in range(layers)]
    wq = [_rint(keys, (n, k // 2)) for _ in range(layers)]
    sw = [_scales(keys, (n,)) for _ in range(layers)]
    wb = [rnd((n, k)) for _ in range(layers)]
  case = f"M{m}_K{k}_N{n}"
  print(case, flush=True)

  def mm(implementation, config=None):
    return lambda x, w, s: w4a16.w4a16_matmul(
        x, w, s, config=config, implementation=implementation,
        interpret=_INTERPRET.value and implementation == "pallas")

  ref = over_layers(mm("xla"), x, wq, sw)()
  best = _best(lambda c: over_layers(mm("pallas", c), x, wq, sw),
               _W4A16_CONFIGS, close_to=ref)
  bf16 = benchmarking.median_ms(over_layers(_bf16_mm, x, wb))
  if best is None:
    return []
  base = {"xla_bf16": bf16 / layers}
  ms, cfg = best[0] / layers, best[1]
  gbs = (n * k / 2 + m * k * 2 + m * n * 2) / ms / 1e6
  print(f"  -> ours {ms:.4f} ms ({gbs:.0f} GB/s) bf16 {base['xla_bf16']:.4f}",
        flush=True)
  return [benchmarking.record(
      "w4a16_matmul", case, ms, base, command=command,
      ours_gbps=round(gbs, 1), config=str(cfg), layers=layers,
      decode_timing=timing)]


def _over_layers(mm, x, *stacks):
  """A zero-argument timed callable: `mm(x, *one_layer)` for every layer of
  `stacks` ([layers, ...] each) in one jitted lax.map."""
  fn = jax.jit(lambda x, *st: jax.lax.map(lambda a: mm(x, *a), st))
  return lambda: fn(x, *stacks)


def _unrolled(mm, xs, *weights):
  """A zero-argument timed callable: `mm(xs[l], *weights[l])` for each layer
  l of the per-layer lists, one call per layer unrolled in one jit (no
  slicing out of a stack). Returns the tuple of outputs (all live)."""
  fn = jax.jit(lambda xs, *ws: tuple(
      mm(x, *w) for x, *w in zip(xs, *ws)))
  return lambda: fn(xs, *weights)


def _bind(op, args, cfg, **kwargs):
  """A zero-argument timed callable for `op(*args, config=cfg, **kwargs)`."""
  fn = jax.jit(lambda *a: op(*a, config=cfg, **kwargs))
  return lambda: fn(*args)


if __name__ == "__main__":
  app.run(main)
