"""Every Mosaic GPU kernel configuration the model runs lowers for CUDA here.

Mosaic GPU has no interpret mode for these kernels (register wgmma
operands), so the CPU cannot run them; but lowering (Pallas -> Mosaic GPU
-> its MLIR) runs on any machine, and it is where wrong layouts, transforms,
scratch shapes and API drift fail. These tests catch that before a GPU call
does; the `gpu` tests in the kernels' own files check the numbers.
`tests/test_gpu_lowering.py` lowers the whole model with its default
kernels; this file lowers each kernel's other configurations too.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_matmul as dm
from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import mosaic_gpu as mg


def _lower(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()


def _w4a4_operands(m=256, n=256, k=512):
  kx, kw = jax.random.split(jax.random.key(m + n + k))
  x = jax.random.randint(kx, (m, k), -8, 8, jnp.int8)
  w = jax.random.randint(kw, (n, k), -8, 8, jnp.int8)
  return (x, int4_layout.pack_int4(w), jnp.ones((m,), jnp.float32),
          jnp.ones((n,), jnp.float32))


# The prefill W4A4 kernel in each way the model (and its benchmarks) call it.
_WT_CASES = {
    "per_channel": dict(),
    "f32_out": dict(out_dtype=jnp.float32),
    "residual": dict(residual=True),
    "transposed": dict(transposed=True),
    "grouped_weights": dict(groups=(None, 4)),  # the model's 128G mode
    "grouped_both": dict(groups=(4, 4)),
}


@pytest.mark.parametrize("case", sorted(_WT_CASES))
def test_w4a4_wt_kernel_lowers(case):
  kw = dict(_WT_CASES[case])
  x, w_q, s_x, s_w = _w4a4_operands()
  gx, gw = kw.pop("groups", (None, None))
  if gx:
    s_x = jnp.ones((x.shape[0], gx), jnp.float32)
  if gw:
    s_w = jnp.ones((w_q.shape[0], gw), jnp.float32)
  args = [x, w_q, s_x, s_w]
  if kw.pop("residual", False):
    args.append(jnp.zeros((x.shape[0], w_q.shape[0]), jnp.bfloat16))
    fn = lambda *a: mg.w4a4_matmul_mosaic_wt(*a[:4], residual=a[4])
  else:
    fn = lambda *a: mg.w4a4_matmul_mosaic_wt(*a, **kw)
  assert "mosaic_gpu" in _lower(fn, *args)


@pytest.mark.parametrize("packed_x", [False, True])
def test_w4a4_smem_widening_kernels_lower(packed_x):
  x, w_q, s_x, s_w = _w4a4_operands()
  if packed_x:
    x = int4_layout.pack_int4(x)
  assert "mosaic_gpu" in _lower(mg.w4a4_matmul_mosaic, x, w_q, s_x, s_w)
  w8 = mg.unpack_weights(w_q)
  assert "mosaic_gpu" in _lower(mg.w4a4_matmul_mosaic_w8, x, w8, s_x, s_w)


_DECODE_CONFIGS = {
    "w4a4_default": dm.default_decode_matmul_config("mosaic"),
    "w4a16": dataclasses.replace(dm.default_decode_matmul_config("mosaic"),
                                 w4a4_mma="bf16"),
    "wgmma_layout": dm.DecodeMatmulConfig(block_n=64, w_layout="wgmma"),
    "warp_specialized": dm.DecodeMatmulConfig(block_n=64,
                                              warp_specialized=True),
}


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("name", sorted(_DECODE_CONFIGS))
def test_decode_matmul_kernel_lowers(name, m):
  # K = 11 blocks of 128 x 3 splits: a short last split (a dynamic grid).
  # `decode_matmul` refuses 'mosaic' off a Hopper GPU, so its kernel call
  # (`_partials_mosaic`) is lowered directly.
  cfg = dataclasses.replace(_DECODE_CONFIGS[name], block_k=128, split_k=3)
  n, k = 192, 1408
  x_dtype = jnp.int8 if cfg.w4a4_mma == "int8" else jnp.bfloat16
  plan = dm._plan(m, n, k, cfg, "mosaic")  # pylint: disable=protected-access
  fn = lambda x, w: dm._partials_mosaic(x, w, plan, cfg)  # pylint: disable=protected-access
  text = _lower(fn, jnp.zeros((m, k), x_dtype),
                jnp.zeros((n, k // 2), jnp.uint8))
  assert "mosaic_gpu" in text
