"""Decode-step append to packed 4-bit KV caches, in place, in one launch.

Quantizes one new key row and one new value row per (row, kv head) with
QuaRot's asymmetric 4-bit quantizer (`kv4_cache.quantize_kv4`) and writes
codes, scale and zero of both into slot `at` of the `kv4_cache.KV4` caches:
  k_cache[b, k, at] <- quantize_kv4(k_new[b, k]), v_cache likewise,
which is `kv4_cache.write_kv4` with T = 1 for keys and for values, bit for
bit. Shape letters as in `quarot_jax/model.py`: B batch, K kv heads, S
slots, H head dim. Layout of the caches (`kv4_cache.py`): codes
uint8[B, K, S, H // 2] in the int4 packing of `int4_layout.py` (low nibble =
even h), scale f32[B, K, S], zero uint8[B, K, S].

Why: XLA runs `write_kv4` as ~8 launches a layer (the min and max
reductions, the quantizer, six dynamic_update_slices), each ~3 us at decode;
this is one launch. The caches are `input_output_aliases`, so only the
written slot is touched (XLA copies a cache first only if its old value is
still used afterwards).

Grid (B, K); each program reads the H values of one key and one value row
(even and odd h as two strided loads) and writes one slot of six arrays.
`at` is a runtime int32 scalar, taken as `lax.dynamic_update_slice` takes
it: a negative `at` counts from the end (at + S), then it is clamped to
[0, S - 1].

Numerics: the f32 ops are those XLA runs for `quantize_kv4` after its
algebraic simplifier, written out so that the Triton kernel, which XLA does
not simplify, computes the same (checked on CPU from the optimized HLO):
  lo = min(min_h x, 0) * clip,  hi = max(max_h x, 0) * clip,
  scale = (hi - lo) * f32(1 / 15)        (XLA: A / const -> A * (1 / const))
  scale = scale if scale > 0 else 1,  zero = round(-lo / scale),
  code = clip(round(x * (1 / scale)) + zero, 0, 15)
                                         (XLA: A / bcast(B) -> A * bcast(1/B))
with round half to even. On the GPU the products are `mul.rn.f32` and the
rounding `cvt.rni.f32.f32` (inline PTX): Triton lowers no `round`, and an
explicit `.rn` keeps LLVM and ptxas from contracting a product and the
following add into an FMA, which XLA's own kernels do not do. Divisions are
Triton's `div.full.f32`, which is what XLA emits for f32 division
(`-nvptx-prec-divf32=1`).

Backend: the Pallas Triton lowering (interpret mode on the CPU). Needs H / 2
a power of two on the GPU. Not supported: more than one new token a row
(prefill uses `write_kv4`), a slot per row, group scales inside a head.
"""

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import compat
from pallas_kernels import kv4_cache as kv4_lib

_MAXQ = 15  # largest 4-bit unsigned code
# The constant XLA's simplifier puts in place of `/ 15`: 1 / 15 rounded to f32.
_INV_MAXQ = float(np.float32(1) / np.float32(_MAXQ))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KV4AppendConfig:
  """Launch parameters (one program per (row, kv head) does little work).

  Attributes:
    num_warps: Triton warps per program.
  """

  num_warps: int = 1

  def __post_init__(self):
    if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two")


def kernel_takes(head_dim: int) -> bool:
  """Whether the Pallas kernel takes heads of H on a GPU: H / 2 = 2^k."""
  h2 = head_dim // 2
  return head_dim % 2 == 0 and h2 > 0 and h2 & (h2 - 1) == 0


def can_use_kv4_append(head_dim: int) -> bool:
  """True where the Pallas kernel compiles: a GPU and `kernel_takes(H)`."""
  return jax.default_backend() == "gpu" and kernel_takes(head_dim)


def f32_ops(exact: bool):
  """(mul, round) for f32 arrays: PTX with `.rn` on the GPU, else jnp."""
  if not exact:
    return (lambda a, b: a * b), jnp.round

  def asm(code, *args):
    [out] = pl_triton.elementwise_inline_asm(
        code, args=list(args), constraints="=f" + ",f" * len(args), pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape,
                                                  jnp.float32)])
    return out

  return (lambda a, b: asm("mul.rn.f32 $0, $1, $2;", a, b),
          lambda a: asm("cvt.rni.f32.f32 $0, $1;", a))


def _quantize_row(x_ref, clip_ratio: float, exact: bool):
  """One row [1, H] -> (bytes uint8[1, H // 2], scale f32[1], zero u8[1])."""
  h2 = x_ref.shape[1] // 2
  even = x_ref[:, pl.ds(0, h2, stride=2)].astype(jnp.float32)  # [1, H // 2]
  odd = x_ref[:, pl.ds(1, h2, stride=2)].astype(jnp.float32)
  return quantize_halves(even, odd, clip_ratio, exact)


def quantize_halves(even: jax.Array, odd: jax.Array, clip_ratio: float,
                    exact: bool):
  """In a kernel: R rows' even and odd elements f32[R, H // 2] ->
  (bytes uint8[R, H // 2], scale f32[R], zero u8[R]) of `quantize_kv4`,
  one quantizer per row. `exact`: the GPU's `.rn` PTX products and
  rounding (see the module docstring); False in interpret mode."""
  # [R] ranges, 0 included (min/max are exact in any order).
  xmin = jnp.minimum(jnp.minimum(even.min(axis=1), odd.min(axis=1)), 0.0)
  xmax = jnp.maximum(jnp.maximum(even.max(axis=1), odd.max(axis=1)), 0.0)
  scale, zero = row_scale_zero(xmin, xmax, clip_ratio, exact)
  codes = lambda v: row_codes(v, scale, zero, exact)
  packed = codes(even) | (codes(odd) << 4)  # low nibble = even h
  return (packed.astype(jnp.uint8), scale,
          zero.astype(jnp.int32).astype(jnp.uint8))


def row_scale_zero(xmin: jax.Array, xmax: jax.Array, clip_ratio: float,
                   exact: bool) -> tuple[jax.Array, jax.Array]:
  """In a kernel: the KV4 quantizer's f32 scale and zero point [R] from
  each row's min and max f32[R] (0 included), as `quantize_kv4`."""
  mul, rnd = f32_ops(exact)
  full = lambda v: jnp.full(xmin.shape, v, jnp.float32)
  lo = mul(xmin, full(clip_ratio))
  hi = mul(xmax, full(clip_ratio))
  scale = mul(hi - lo, full(_INV_MAXQ))
  scale = jnp.where(scale > 0, scale, 1.0)
  return scale, rnd(-lo / scale)  # zero: integers in 0..15


def row_codes(v: jax.Array, scale: jax.Array, zero: jax.Array,
              exact: bool) -> jax.Array:
  """In a kernel: int32 codes 0..15 of v f32[R, W] with each row's scale
  and zero point f32[R] (`row_scale_zero`)."""
  mul, rnd = f32_ops(exact)
  shape = v.shape
  inv = jax.lax.broadcast_in_dim(1.0 / scale, shape, (0,))
  zero_row = jax.lax.broadcast_in_dim(zero, shape, (0,))
  return jnp.clip(rnd(mul(v, inv)) + zero_row, 0, _MAXQ).astype(jnp.int32)


def kv4_append_kernel(at_ref, k_ref, v_ref, kc_in, ks_in, kz_in, vc_in, vs_in,
                      vz_in, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref,
                      *, k_clip_ratio: float, v_clip_ratio: float,
                      exact: bool):
  """One (row, kv head): quantizes its key and value, writes slot `at`."""
  # at_ref: int32[] the slot;  k_ref, v_ref: [1, H] new key / value
  # kc/vc: uint8[S, H // 2] codes;  ks/vs: f32[S];  kz/vz: uint8[S]
  # The *_in refs alias the outputs (input_output_aliases): only written.
  del kc_in, ks_in, kz_in, vc_in, vs_in, vz_in
  s_len = kc_ref.shape[0]
  at = at_ref[()]
  at = jnp.where(at < 0, at + s_len, at)  # as jax's dynamic_update_slice
  rows = pl.ds(jnp.clip(at, 0, s_len - 1), 1)
  for x_ref, c_ref, s_ref, z_ref, clip_ratio in (
      (k_ref, kc_ref, ks_ref, kz_ref, k_clip_ratio),
      (v_ref, vc_ref, vs_ref, vz_ref, v_clip_ratio)):
    codes, scale, zero = _quantize_row(x_ref, clip_ratio, exact)
    c_ref[rows, :] = codes
    s_ref[rows] = scale
    z_ref[rows] = zero


def check_kv4_append_shapes(k_cache: kv4_lib.KV4, v_cache: kv4_lib.KV4,
                            k_new: jax.Array, v_new: jax.Array,
                            at: jax.Array) -> tuple[int, int, int, int]:
  """Checks shapes and dtypes of `kv4_append`'s operands.

  Args:
    k_cache: `KV4` keys, codes uint8[B, K, S, H // 2].
    v_cache: `KV4` values, the same shapes.
    k_new: [B, K, H] new keys.
    v_new: [B, K, H] new values.
    at: int32[] slot.

  Returns:
    (B, K, S, H).

  Raises:
    ValueError: naming the operand and shapes that do not fit.
  """
  for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
    if c.codes.dtype != jnp.uint8 or c.codes.ndim != 4:
      raise ValueError(f"{name}.codes must be uint8[B, K, S, H // 2], got"
                       f" {c.codes.dtype}{list(c.codes.shape)}")
    if c.scale.shape != c.codes.shape[:3] or c.scale.dtype != jnp.float32:
      raise ValueError(f"{name}.scale must be f32[B, K, S]="
                       f"{list(c.codes.shape[:3])}, got"
                       f" {c.scale.dtype}{list(c.scale.shape)}")
    if c.zero.shape != c.codes.shape[:3] or c.zero.dtype != jnp.uint8:
      raise ValueError(f"{name}.zero must be uint8[B, K, S]="
                       f"{list(c.codes.shape[:3])}, got"
                       f" {c.zero.dtype}{list(c.zero.shape)}")
  if v_cache.codes.shape != k_cache.codes.shape:
    raise ValueError(f"k_cache and v_cache differ: {k_cache.codes.shape=}"
                     f" {v_cache.codes.shape=}")
  b, kv_heads, s, h2 = k_cache.codes.shape
  for name, x in (("k_new", k_new), ("v_new", v_new)):
    if x.shape != (b, kv_heads, 2 * h2):
      raise ValueError(f"{name} must be [B, K, H]={[b, kv_heads, 2 * h2]}"
                       f" for caches of codes [B, K, S, H // 2]="
                       f"{list(k_cache.codes.shape)}, got {x.shape}")
  if jnp.ndim(at) != 0:
    raise ValueError(f"at must be a scalar slot, got shape {jnp.shape(at)}")
  return b, kv_heads, s, 2 * h2


@functools.partial(jax.jit, static_argnames=(
    "k_clip_ratio", "v_clip_ratio", "config", "interpret", "debug",
    "implementation"))
def kv4_append(
    k_cache: kv4_lib.KV4, v_cache: kv4_lib.KV4, k_new: jax.Array,
    v_new: jax.Array, at: jax.Array, *, k_clip_ratio: float = 0.95,
    v_clip_ratio: float = 0.95, config: KV4AppendConfig | None = None,
    interpret: bool = False, debug: bool = False,
    implementation: Literal["pallas", "xla"] | None = None,
) -> tuple[kv4_lib.KV4, kv4_lib.KV4]:
  """Quantizes one new key and value a row and writes them into slot `at`.

  Args:
    k_cache: `KV4` keys: codes uint8[B, K, S, H // 2], scale f32[B, K, S],
      zero uint8[B, K, S].
    v_cache: `KV4` values, the same shapes.
    k_new: float[B, K, H] new keys (bf16, f16 or f32; quantized in f32).
    v_new: float[B, K, H] new values.
    at: int32[] slot shared by the batch; as in `lax.dynamic_update_slice`,
      a negative one counts from the end (at + S), then it is clamped to
      [0, S - 1].
    k_clip_ratio: range clip of the key quantizer (QuaRot: 0.95).
    v_clip_ratio: range clip of the value quantizer.
    config: launch parameters; `KV4AppendConfig()` when None.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas' (the kernel where `kernel_takes` H, else the
      reference), 'xla' (the reference) or None (pallas on a GPU where
      `can_use_kv4_append`, or when interpret=True; else the reference;
      logged).

  Returns:
    (k_cache, v_cache) with slot `at` of every (row, kv head) rewritten;
    equal bit for bit to `kv4_append_reference`. The caches' buffers are
    updated in place where XLA can donate them.

  Raises:
    ValueError: shapes or dtypes that do not fit together.
  """
  _, _, _, h = check_kv4_append_shapes(k_cache, v_cache, k_new, v_new, at)
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_kv4_append(h)
                      else "xla")
    logging.info("kv4_append: using %s", implementation)
  elif implementation == "pallas" and not (interpret or kernel_takes(h)):
    implementation = "xla"
    logging.info("kv4_append: the kernel does not take H=%d; using the"
                 " reference", h)
  if implementation == "xla":
    return kv4_append_reference(k_cache, v_cache, k_new, v_new, at,
                                k_clip_ratio=k_clip_ratio,
                                v_clip_ratio=v_clip_ratio)
  cfg = config or KV4AppendConfig()
  b, kv_heads, s, h2 = k_cache.codes.shape
  kernel = functools.partial(kv4_append_kernel, k_clip_ratio=k_clip_ratio,
                             v_clip_ratio=v_clip_ratio, exact=not interpret)
  scalar = pl.BlockSpec((None,), lambda i, j: (0,))
  row = pl.BlockSpec((None, None, 1, h), lambda i, j: (i, j, 0, 0))
  codes = pl.BlockSpec((None, None, s, h2), lambda i, j: (i, j, 0, 0))
  per_slot = pl.BlockSpec((None, None, s), lambda i, j: (i, j, 0))
  caches = [codes, per_slot, per_slot] * 2
  arrays = (k_cache.codes, k_cache.scale, k_cache.zero, v_cache.codes,
            v_cache.scale, v_cache.zero)
  # [B, K, H] -> [B, K, 1, H]: a 2-D block of one row.
  new = [x.reshape(b, kv_heads, 1, h) for x in (k_new, v_new)]
  out = pl.pallas_call(
      kernel,
      grid=(b, kv_heads),
      in_specs=[scalar, row, row] + caches,
      out_specs=caches,
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
      input_output_aliases={3 + i: i for i in range(6)},
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=1),
      interpret=interpret, debug=debug, name="kv4_append",
  )(jnp.asarray(at, jnp.int32).reshape(1), *new, *arrays)
  return (kv4_lib.KV4(codes=out[0], scale=out[1], zero=out[2]),
          kv4_lib.KV4(codes=out[3], scale=out[4], zero=out[5]))


@functools.partial(jax.jit, static_argnames=("k_clip_ratio", "v_clip_ratio"))
def kv4_append_reference(
    k_cache: kv4_lib.KV4, v_cache: kv4_lib.KV4, k_new: jax.Array,
    v_new: jax.Array, at: jax.Array, *, k_clip_ratio: float = 0.95,
    v_clip_ratio: float = 0.95) -> tuple[kv4_lib.KV4, kv4_lib.KV4]:
  """`kv4_append` as two `kv4_cache.write_kv4` calls (T = 1).

  Args:
    k_cache: `KV4` keys, codes uint8[B, K, S, H // 2].
    v_cache: `KV4` values, the same shapes.
    k_new: float[B, K, H] new keys.
    v_new: float[B, K, H] new values.
    at: int32[] slot (negative: from the end; then clamped, by
      `lax.dynamic_update_slice`).
    k_clip_ratio: range clip of the key quantizer.
    v_clip_ratio: range clip of the value quantizer.

  Returns:
    (k_cache, v_cache), new pytrees.

  Raises:
    ValueError: shapes or dtypes that do not fit together.
  """
  check_kv4_append_shapes(k_cache, v_cache, k_new, v_new, at)
  # [B, K, H] -> [B, T = 1, K, H]
  return (kv4_lib.write_kv4(k_cache, k_new[:, None], at,
                            clip_ratio=k_clip_ratio),
          kv4_lib.write_kv4(v_cache, v_new[:, None], at,
                            clip_ratio=v_clip_ratio))
