"""Stateless building blocks of a LLaMA decoder: RMSNorm, RoPE, SwiGLU.

All math runs in float32 and is cast back to the input dtype, as in
Hugging Face's implementation, so that float32 parity is exact up to
summation order.
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels import hadamard_quant as hq_lib


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float,
             keep_roundings: bool = False) -> jax.Array:
  """RMSNorm: `scale * x / sqrt(mean(x**2) + eps)`.

  Computes in f32 and rounds to x's dtype twice, after the normalization
  and after the scale (as `transformers`' LlamaRMSNorm does).

  Args:
    x: [..., D] activations.
    scale: [D] learned scale.
    eps: added to the mean square.
    keep_roundings: keep both roundings inside a jit on the GPU, where XLA
      otherwise drops a convert to bf16 and back within one fusion
      (`xla_allow_excess_precision`). Set where a quantizer reads the
      output, so that its codes equal the fused `rms_norm_quant` kernel's
      and the op-by-op norm's; it costs a fusion boundary, so the float
      model leaves it off.

  Returns:
    [..., D] in the dtype of `x`.
  """
  rounded = _rounded if keep_roundings else lambda v: v
  x32 = x.astype(jnp.float32)
  var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  normed = rounded((x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype))
  return rounded((scale.astype(jnp.float32)
                  * normed.astype(jnp.float32)).astype(x.dtype))


def _rounded(x: jax.Array) -> jax.Array:
  """x unchanged, but a convert that produced it stays (XLA cannot pair it
  with a following convert back to f32 across the barrier)."""
  if x.dtype == jnp.float32:
    return x
  return jax.lax.optimization_barrier(x)


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: dict | None = None) -> jax.Array:
  """Inverse frequencies f32[H // 2] of rotary embeddings.

  Args:
    head_dim: H.
    theta: the RoPE base (`rope_theta`).
    scaling: HF `rope_scaling` of type 'llama3' (Llama-3.1/3.2), or None.

  Returns:
    f32[H // 2].
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                              / head_dim))
  if not scaling:
    return inv_freq
  factor = scaling["factor"]
  low = scaling.get("low_freq_factor", 1.0)
  high = scaling.get("high_freq_factor", 4.0)
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Rotary cosines and sines, f32[..., H] each, at int32 `positions`
  [...] (HF's rotate-half layout: the H / 2 frequencies twice)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in HF's rotate-half layout.

  Args:
    x: [B, T, heads, H].
    positions: int32[B, T].
    inv_freq: f32[H // 2] from `rope_inv_freq`.

  Returns:
    [B, T, heads, H] in the dtype of `x`.
  """
  cos, sin = rope_cos_sin(positions, inv_freq)  # [B, T, H]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`silu(gate) * up`, the LLaMA FFN activation ([..., F] -> [..., F]),
  in f32 and rounded to gate's dtype: `hadamard_quant.swiglu`, the one
  definition, which the packed down_proj's quantize kernel also runs."""
  return hq_lib.swiglu(gate, up)
