"""w4a4_matmul.mosaic_gpu (Hopper) against the reference.

The kernel has no interpret mode: on the CPU only its layout helpers,
configs and argument checks are tested; the `gpu` tests run it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import mosaic_gpu as mgpu
from pallas_kernels.w4a4_matmul import reference
from tests.pallas_kernels.w4a4_matmul import operands

pack = int4_layout.pack_int4
Config = mgpu.W4A4MosaicConfig


def _operands(m, n, k, seed=0):
  """Packed int4 x, w and f32 scales (random, never zero)."""
  x, w, sx, sw = operands.codes(m, n, k, seed)
  return pack(x), pack(w), sx, sw


def _reference(xq, wq, sx, sw, out_dtype=jnp.float32):
  return reference.w4a4_matmul_reference(xq, wq, sx, sw, out_dtype=out_dtype)


def test_packed_to_int4_keeps_the_layout():
  x = jnp.array([[1, -2, 7, -8, 0, 3]], jnp.int8)
  got = mgpu.packed_to_int4(pack(x))
  assert got.dtype == jnp.int4 and got.shape == (1, 6)
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.int8)), x)


def test_unpack_weights_values():
  _, wq, _, _ = _operands(8, 16, 64)
  w8 = mgpu.unpack_weights(wq)
  assert w8.dtype == jnp.int8 and w8.shape == (16, 64)
  np.testing.assert_array_equal(np.asarray(pack(w8)), np.asarray(wq))


def test_config_errors():
  with pytest.raises(ValueError, match="block_m"):
    Config(block_m=96)
  with pytest.raises(ValueError, match="block_k"):
    Config(block_k=64)
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    Config(max_concurrent_steps=1)


def test_shape_errors():
  # Checked before anything is lowered, so they run on the CPU too.
  xq, wq, sx, sw = _operands(16, 32, 128)
  run = mgpu.w4a4_matmul_mosaic
  with pytest.raises(ValueError, match="K differs"):
    run(xq[:, :32], wq, sx, sw)
  with pytest.raises(ValueError, match="scales"):
    run(xq, wq, sx[:8], sw)
  with pytest.raises(ValueError, match="must be uint8"):
    run(xq.astype(jnp.int32), wq, sx, sw)
  with pytest.raises(ValueError, match="K differs"):  # int8 x is unpacked.
    run(xq.astype(jnp.int8), wq, sx, sw)
  with pytest.raises(ValueError, match="w int8"):  # the w8 diagnostic
    mgpu.w4a4_matmul_mosaic_w8(xq, wq, sx, sw)


def test_smem_bytes_matches_what_mosaic_allocated():
  # On the H100 this config raised "smem_bytes=280656" (80 of barriers).
  cfg = Config(block_k=256, max_concurrent_steps=3)
  assert mgpu.smem_bytes(cfg, x_int4=True, w_int4=False,
                         out_dtype=jnp.bfloat16) == 280656 - 80


@pytest.mark.parametrize("x_int4", [False, True])
@pytest.mark.parametrize("w_int4", [False, True])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_default_config_fits_and_keeps_register_operands_at_depth_0(
    x_int4, w_int4, out_dtype):
  cfg = mgpu.default_w4a4_mosaic_config(x_int4=x_int4, w_int4=w_int4,
                                        out_dtype=out_dtype)
  assert mgpu.smem_bytes(cfg, x_int4=x_int4, w_int4=w_int4,
                         out_dtype=out_dtype) < 232448
  assert cfg.wgmma_depth == (0 if x_int4 else 1)


# Not tile multiples on purpose: M 200 (CTA 128), N 328 (CTA 256), K 384+64.
_GPU_SHAPES = [(200, 328, 448), (256, 512, 1024), (2048, 1024, 4096)]


def _run_gpu(args, *, x_operand, widen, cfg=None, out_dtype=jnp.float32):
  xq, wq, sx, sw = args
  if widen == "kernel":
    return mgpu.w4a4_matmul_mosaic(xq, wq, sx, sw, x_operand=x_operand,
                                   out_dtype=out_dtype, config=cfg)
  return mgpu.w4a4_matmul_mosaic_w8(xq, mgpu.unpack_weights(wq), sx, sw,
                                    x_operand=x_operand, out_dtype=out_dtype,
                                    config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", _GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("x_operand", ["smem", "registers"])
def test_mgpu_kernel_matches_reference_on_gpu(m, n, k, out_dtype,
                                              x_operand):
  args = _operands(m, n, k, seed=m + n + k)
  got = _run_gpu(args, x_operand=x_operand, widen="kernel",
                 out_dtype=out_dtype)
  want = _reference(*args, out_dtype=out_dtype)
  # int32 accumulation is exact; the epilogue is the same two f32 products.
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


_CONFIGS = [
    dict(wg_dimension="m", grid_minor_dim="m"),
    dict(block_m=64),
    dict(block_n=64),
    dict(max_concurrent_steps=2),
    dict(grid_tile_width=1),
    dict(wgmma_depth=1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fields", _CONFIGS, ids=str)
@pytest.mark.parametrize("x_operand", ["smem", "registers"])
@pytest.mark.parametrize("widen", ["kernel", "load"])
def test_mgpu_configs_on_gpu(fields, x_operand, widen):
  if x_operand == "registers" and fields.get("wgmma_depth"):
    pytest.skip("covered by test_register_operand_rejects_depth_1")
  # 3 steps where they fit in shared memory, else 2 (int8 x widened in a
  # 256-row CTA overflows at 3: 256080 bytes on the H100).
  for steps in (3, 2):
    cfg = Config(**{"max_concurrent_steps": steps, **fields})
    if mgpu.smem_bytes(cfg, x_int4=x_operand == "registers",
                       w_int4=widen == "kernel",
                       out_dtype=jnp.float32) + 1024 <= 232448:
      break
  args = _operands(384, 640, 1024, seed=3)
  got = _run_gpu(args, x_operand=x_operand, widen=widen, cfg=cfg)
  want = _reference(*args)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", _GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fields", [{}, dict(wg_dimension="m")], ids=str)
@pytest.mark.parametrize("transposed", [False, True])
def test_weights_as_register_operand_give_y_on_gpu(
    m, n, k, out_dtype, fields, transposed):
  xq, wq, sx, sw = _operands(m, n, k, seed=m * n + k)
  x8 = mgpu.unpack_weights(xq)  # int8 codes, as the model hands them over
  got = mgpu.w4a4_matmul_mosaic_wt(x8, wq, sx, sw, out_dtype=out_dtype,
                                   config=Config(**fields) if fields
                                   else None, transposed=transposed)
  # The kernel computes yᵀ; by default its epilogue transposes each tile in
  # registers and stores y.
  assert got.shape == ((n, m) if transposed else (m, n))
  want = _reference(xq, wq, sx, sw, out_dtype=out_dtype)
  # Bit for bit: exact int32 sums, the scales in the reference's f32 order.
  np.testing.assert_array_equal(
      np.asarray(got.T if transposed else got, np.float32),
      np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", _GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_weights_as_register_operand_add_a_residual_on_gpu(m, n, k,
                                                           out_dtype):
  # The residual add in the epilogue (chunks loaded by TMA one ahead) is
  # XLA's `y + r` bit for bit, at shapes that are not tile multiples.
  xq, wq, sx, sw = _operands(m, n, k, seed=m + 2 * n + k)
  x8 = mgpu.unpack_weights(xq)
  r = (jax.random.normal(jax.random.key(m), (m, n)) * 50).astype(out_dtype)
  got = mgpu.w4a4_matmul_mosaic_wt(x8, wq, sx, sw, out_dtype=out_dtype,
                                   residual=r)
  want = _reference(xq, wq, sx, sw, out_dtype=out_dtype) + r
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


def test_weights_as_register_operand_check_the_residual():
  xq, wq, sx, sw = _operands(128, 256, 128)
  x8 = mgpu.unpack_weights(xq)
  with pytest.raises(ValueError, match="not with transposed"):
    mgpu.w4a4_matmul_mosaic_wt(x8, wq, sx, sw, transposed=True,
                               residual=jnp.zeros((128, 256), jnp.bfloat16))


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_weights_as_register_operand_default_tiles_fit_shared_memory(
    out_dtype):
  # The wt kernel's "x" is the int4 weights, its "w" the int8 codes. 256
  # tokens a tile either way; f32 outputs overflowed by 64 bytes at
  # 256-wide K steps on the H200 (2026-12-04), so they get 128-wide ones.
  cfg = mgpu.default_w4a4_mosaic_wt_config(out_dtype)
  assert (cfg.block_m, cfg.block_n, cfg.wg_dimension) == (64, 256, "m")
  assert cfg.block_k == (256 if out_dtype == jnp.bfloat16 else 128)
  assert mgpu.smem_bytes(cfg, x_int4=True, w_int4=False,
                         out_dtype=out_dtype) + 1024 <= 232448
  # A residual's staging (one epilogue chunk per warpgroup) fits the same
  # bf16 tiles.
  with_r = mgpu.default_w4a4_mosaic_wt_config(out_dtype, residual=True)
  if out_dtype == jnp.bfloat16:
    assert with_r == cfg
  assert mgpu.smem_bytes(with_r, x_int4=True, w_int4=False,
                         out_dtype=out_dtype, residual=True) + 1024 <= 232448


def test_weights_as_register_operand_check_their_arguments():
  xq, wq, sx, sw = _operands(128, 256, 128)
  with pytest.raises(ValueError, match="scales must be"):
    mgpu.w4a4_matmul_mosaic_wt(xq, wq, sw, sx)


@pytest.mark.gpu
def test_register_operand_rejects_depth_1():
  with pytest.raises(ValueError, match="wgmma_depth=1 needs int8"):
    _run_gpu(_operands(128, 256, 128), x_operand="registers", widen="kernel",
             cfg=Config(wgmma_depth=1))


@pytest.mark.gpu
def test_mgpu_lowers_to_mosaic_gpu():
  xq, wq, sx, sw = _operands(512, 768, 2048, seed=7)
  hlo = jax.jit(mgpu.w4a4_matmul_mosaic).lower(xq, wq, sx, sw).as_text()
  assert "mosaic_gpu" in hlo


# The 128G mode: group scales along K, one group per pipeline step.
def _grouped(m, n, k, group, which, seed):
  """Packed x, w and scales with `which` side(s) grouped along K."""
  xq, wq, sx, sw = _operands(m, n, k, seed=seed)
  if which in ("both", "x"):
    sx = operands.group_scales(m, k // group, seed + 1)
  if which in ("both", "w"):
    sw = operands.group_scales(n, k // group, seed + 2)
  return xq, wq, sx, sw


def _assert_grouped_close(got, want):
  # Exact int32 group sums, scaled and summed over G in the reference's
  # order; only the f32 rounding of those few terms may differ (FMA).
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", _GPU_SHAPES[1:] + [(200, 328, 512)])
@pytest.mark.parametrize("which", ["both", "x", "w"])
@pytest.mark.parametrize("group", [128, 256])
def test_group_scales_match_reference_on_gpu(m, n, k, which, group):
  xq, wq, sx, sw = _grouped(m, n, k, group, which, seed=m + n + group)
  got = mgpu.w4a4_matmul_mosaic_wt(mgpu.unpack_weights(xq), wq, sx, sw,
                                   out_dtype=jnp.float32)
  want = _reference(xq, wq, sx, sw)
  _assert_grouped_close(got, want)
  # The per-channel result is far away: the group scales were applied.
  if which == "both":
    flat = _reference(xq, wq, sx[:, 0], sw[:, 0])
    assert float(jnp.abs(flat - want).max()) > 0.1 * float(
        jnp.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [
    dict(group_convert="cvt"), dict(group_overlap=False),
    dict(grid_minor_dim="m", max_concurrent_steps=2)],
                         ids=str)
def test_group_scale_configs_give_the_same_y_on_gpu(fields):
  # The magic-number conversion is exact, and adding each group under the
  # next group's wgmma keeps the order: all bit-equal to the default.
  args = _grouped(384, 640, 1024, 128, "both", seed=9)
  x8, rest = mgpu.unpack_weights(args[0]), args[1:]
  base = dict(wg_dimension="m", block_m=64, block_n=128, block_k=128,
              group_overlap=True)
  got = mgpu.w4a4_matmul_mosaic_wt(x8, *rest, out_dtype=jnp.float32,
                                   config=Config(**{**base, **fields}))
  want = mgpu.w4a4_matmul_mosaic_wt(x8, *rest, out_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _assert_grouped_close(got, _reference(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [dict(group_overlap=False),
                                    dict(group_convert="cvt")], ids=str)
def test_grouped_weights_per_token_x_configs_give_the_same_y_on_gpu(fields):
  # The model's 128G mode (s_w grouped, s_x per token): one multiply-add a
  # group, s_x after the sum; the options keep the order, so bit-equal.
  args = _grouped(384, 640, 1024, 128, "w", seed=11)
  x8, rest = mgpu.unpack_weights(args[0]), args[1:]
  assert rest[1].ndim == 1 and rest[2].ndim == 2
  base = mgpu.default_w4a4_mosaic_wt_grouped_config(128, jnp.float32)
  got = mgpu.w4a4_matmul_mosaic_wt(
      x8, *rest, out_dtype=jnp.float32,
      config=dataclasses.replace(base, **fields))
  want = mgpu.w4a4_matmul_mosaic_wt(x8, *rest, out_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _assert_grouped_close(got, _reference(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(200, 328, 512), (2048, 1024, 4096)])
def test_group_scales_with_a_residual_in_bf16_on_gpu(m, n, k):
  xq, wq, sx, sw = _grouped(m, n, k, 128, "both", seed=k)
  r = (jax.random.normal(jax.random.key(m), (m, n)) * 50).astype(
      jnp.bfloat16)
  got = mgpu.w4a4_matmul_mosaic_wt(mgpu.unpack_weights(xq), wq, sx, sw,
                                   residual=r)
  want = _reference(xq, wq, sx, sw, out_dtype=jnp.bfloat16) + r
  # y is rounded to bf16 before the add, as XLA's `y + r`: a one-ulp
  # difference in y (FMA) may survive, nothing more.
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=2 ** -7,
                             atol=2 ** -7 * float(jnp.abs(want).max()))
  assert float(jnp.mean((got == want).astype(jnp.float32))) > 0.99


def test_group_scales_default_tiles_fit_shared_memory():
  for group in (128, 256):
    for residual in (False, True):
      cfg = mgpu.default_w4a4_mosaic_wt_grouped_config(
          group, jnp.bfloat16, residual=residual)
      assert (cfg.block_k, cfg.block_n, cfg.block_m) == (group, 128, 64)
      assert cfg.group_overlap and cfg.group_convert == "magic"
      assert mgpu.smem_bytes(cfg, x_int4=True, w_int4=False,
                             out_dtype=jnp.bfloat16, residual=residual,
                             grouped=True) + 1024 <= 232448
  # The scale rows travel with each pipeline step.
  cfg = mgpu.default_w4a4_mosaic_wt_grouped_config(128)
  assert mgpu.smem_bytes(cfg, x_int4=True, w_int4=False,
                         out_dtype=jnp.bfloat16, grouped=True) == (
                             mgpu.smem_bytes(cfg, x_int4=True, w_int4=False,
                                             out_dtype=jnp.bfloat16)
                             + cfg.max_concurrent_steps * 4 * 256)


def test_group_convert_by_bits_is_exact():
  # The 'magic' conversion: the bits 0x4B400000 + s are 2**23 + 2**22 + s
  # as f32 for |s| < 2**22; subtracting 12582912 is exact.
  s = jnp.arange(-2**21, 2**21, 97, dtype=jnp.int32)
  f = jax.lax.bitcast_convert_type(s + mgpu._MAGIC_INT, jnp.float32)
  np.testing.assert_array_equal(np.asarray(f - mgpu._MAGIC_FLOAT),
                                np.asarray(s, np.float32))
  with pytest.raises(ValueError, match="group_convert"):
    Config(group_convert="fast")


def test_group_scales_check_their_arguments():
  xq, wq, sx, sw = _grouped(128, 256, 512, 64, "both", seed=0)
  x8 = mgpu.unpack_weights(xq)
  with pytest.raises(ValueError, match="group size K / G = 64 must be"):
    mgpu.w4a4_matmul_mosaic_wt(x8, wq, sx, sw)
  xq, wq, sx, sw = _grouped(128, 256, 512, 128, "both", seed=0)
  with pytest.raises(ValueError, match="must equal the group size 128"):
    mgpu.w4a4_matmul_mosaic_wt(mgpu.unpack_weights(xq), wq, sx, sw,
                               config=Config(block_k=256, block_m=64,
                                             wg_dimension="m"))
  with pytest.raises(ValueError, match="group scales must share G"):
    mgpu.w4a4_matmul_mosaic_wt(mgpu.unpack_weights(xq), wq, sx[:, :2], sw)
