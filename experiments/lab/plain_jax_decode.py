"""The plain-JAX bf16 decode anchor, in the benchmark's own process.

A copy of `../shared/anchors/decode_anchor.py`'s decode (ordinary JAX: XLA
dots, einsum attention, per-layer weight and cache arrays, layers unrolled,
`lax.fori_loop` over the steps), generalized to GQA and any LLaMA config, so
that every decode ratio is measured against it in the same run.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax.config import LlamaConfig


def rms(x):
  """RMS norm without a scale (the anchor's weights are 1)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True)
                              + 1e-5)).astype(x.dtype)


def rope(x, pos, head_dim):
  """Rotate-half RoPE of x [B, ..., H] at positions pos int32[B]."""
  half = head_dim // 2
  inv = 1.0 / (10000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  ang = pos[:, None].astype(jnp.float32) * inv  # [B, H / 2]
  # [B, 1, ..., H / 2]: broadcast over the head axes of x.
  shape = (ang.shape[0],) + (1,) * (x.ndim - 2) + (half,)
  c, s = jnp.cos(ang).reshape(shape), jnp.sin(ang).reshape(shape)
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s],
                         -1).astype(x.dtype)


def layer(x, w, kc, vc, pos, config: LlamaConfig):
  """One decode step of one layer.

  Args:
    x: [B, D] bf16.
    w: dict of [in, out] weights wq, wk, wv, wo, wg, wu, wd.
    kc: [B, S, K, H] key cache; vc likewise.
    pos: int32[B], the slot (= position) of the new token, equal in a batch.
    config: sizes.

  Returns:
    (x [B, D], kc, vc).
  """
  b = x.shape[0]
  n, kv, h = (config.num_attention_heads, config.num_key_value_heads,
              config.head_dim)
  hid = rms(x)
  q = rope((hid @ w["wq"]).reshape(b, kv, n // kv, h), pos, h)
  k = rope((hid @ w["wk"]).reshape(b, kv, h), pos, h)
  v = (hid @ w["wv"]).reshape(b, kv, h)
  idx = pos[0]
  kc = jax.lax.dynamic_update_slice(kc, k[:, None], (0, idx, 0, 0))
  vc = jax.lax.dynamic_update_slice(vc, v[:, None], (0, idx, 0, 0))
  s = jnp.einsum("bkgh,bskh->bkgs", q, kc,
                 preferred_element_type=jnp.float32) / np.sqrt(h)
  s = jnp.where(jnp.arange(kc.shape[1])[None, None, None] <= idx, s, -1e30)
  a = jnp.einsum("bkgs,bskh->bkgh", jax.nn.softmax(s, -1).astype(x.dtype),
                 vc).reshape(b, n * h)
  x = x + a @ w["wo"]
  hid = rms(x)
  return x + (jax.nn.silu(hid @ w["wg"]) * (hid @ w["wu"])) @ w["wd"], kc, vc


def decode_ms_per_token(config: LlamaConfig, batch: int, cached: int, *,
                        steps: int = 64, key: jax.Array) -> float:
  """ms per decode step of the anchor (median of 3 timed calls of `steps`
  steps in one jit, after one compiling call), `cached` tokens in a cache of
  `cached + steps` slots."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  qd = config.num_attention_heads * config.head_dim
  kvd = config.num_key_value_heads * config.head_dim
  shapes = dict(wq=(d, qd), wk=(d, kvd), wv=(d, kvd), wo=(qd, d), wg=(d, f),
                wu=(d, f), wd=(f, d))
  num_layers = config.num_hidden_layers
  w = [{n: jax.random.normal(jax.random.fold_in(key, 100 * l + i), shp,
                             jnp.bfloat16) * 0.02
        for i, (n, shp) in enumerate(shapes.items())}
       for l in range(num_layers)]
  cache_shape = (batch, cached + steps, config.num_key_value_heads,
                 config.head_dim)
  kc = [jax.random.normal(jax.random.fold_in(key, 7 * l), cache_shape,
                          jnp.bfloat16) for l in range(num_layers)]
  vc = [c * 0.5 for c in kc]
  emb = jax.random.normal(key, (v, d), jnp.bfloat16) * 0.02
  head = jax.random.normal(key, (d, v), jnp.bfloat16) * 0.02

  @functools.partial(jax.jit, donate_argnums=(4, 5))
  def gen(w, emb, head, tok, kc, vc):
    def step(i, carry):
      tok, kc, vc = carry
      pos = jnp.full((batch,), cached + i, jnp.int32)
      x = emb[tok]
      kc, vc = list(kc), list(vc)
      for l in range(num_layers):
        x, kc[l], vc[l] = layer(x, w[l], kc[l], vc[l], pos, config)
      logits = rms(x) @ head
      return jnp.argmax(logits, -1).astype(jnp.int32), kc, vc
    return jax.lax.fori_loop(0, steps, step, (tok, kc, vc))

  tok = jnp.zeros((batch,), jnp.int32)
  out = jax.block_until_ready(gen(w, emb, head, tok, kc, vc))
  times = []
  for _ in range(3):
    _, kc, vc = out
    begin = time.perf_counter()
    out = jax.block_until_ready(gen(w, emb, head, tok, kc, vc))
    times.append(time.perf_counter() - begin)
  del w, out
  return float(np.median(times)) / steps * 1e3
