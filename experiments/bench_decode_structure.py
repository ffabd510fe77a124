"""Which decode-step structure reads each weight once (issue #14, step 1).

LLaMA-2-7B-shaped bf16 decode with random weights, 64 steps in one jit
(`lax.fori_loop`), ms per token against the weight-read floor. Variants:

  unrolled_lists   per-layer weight and cache arrays, Python loop over layers
                   (`../shared/anchors/decode_anchor.py`'s fast case)
  unrolled_stacked stacked [L, ...] weights and cache, Python loop with
                   static `w[l]` slices, cache updated by one
                   dynamic_update_slice per layer
  fori_stacked     stacked weights and cache, `lax.fori_loop` over layers
                   (dynamic `w[l]`), cache in the loop carry
  scan_stacked     stacked weights, `lax.scan` with the cache as xs/ys
                   (the model's structure before this change)

Usage on the GPU: python -m experiments.bench_decode_structure [B ...]
(XLA_FLAGS can be set around it to compare XLA options).
"""
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lab import plain_jax_decode

L, D, F, N, H, V = 32, 4096, 11008, 32, 128, 32000
HBM = 4.8e12
NAMES = dict(wq=(D, D), wk=(D, D), wv=(D, D), wo=(D, D), wg=(D, F),
             wu=(D, F), wd=(F, D))


def rope(x, pos):
  return plain_jax_decode.rope(x, pos, H)


rms = plain_jax_decode.rms


def layer(x, w, kc, vc, pos):
  """kc, vc: [B, S, N, H]."""
  b = x.shape[0]
  h = rms(x)
  q = rope((h @ w["wq"]).reshape(b, N, H), pos)
  k = rope((h @ w["wk"]).reshape(b, N, H), pos)
  v = (h @ w["wv"]).reshape(b, N, H)
  idx = pos[0]
  kc = jax.lax.dynamic_update_slice(kc, k[:, None], (0, idx, 0, 0))
  vc = jax.lax.dynamic_update_slice(vc, v[:, None], (0, idx, 0, 0))
  s = jnp.einsum("bnh,bsnh->bns", q, kc,
                 preferred_element_type=jnp.float32) / np.sqrt(H)
  s = jnp.where(jnp.arange(kc.shape[1])[None, None] <= idx, s, -1e30)
  a = jnp.einsum("bns,bsnh->bnh", jax.nn.softmax(s, -1).astype(x.dtype),
                 vc).reshape(b, D)
  x = x + a @ w["wo"]
  h = rms(x)
  return x + (jax.nn.silu(h @ w["wg"]) * (h @ w["wu"])) @ w["wd"], kc, vc


def layer_stacked_cache(x, w, kc, vc, pos, l):
  """kc, vc: [L, B, S, N, H]; writes layer l's slot in place."""
  b = x.shape[0]
  h = rms(x)
  q = rope((h @ w["wq"]).reshape(b, N, H), pos)
  k = rope((h @ w["wk"]).reshape(b, N, H), pos)
  v = (h @ w["wv"]).reshape(b, N, H)
  idx = pos[0]
  kc = jax.lax.dynamic_update_slice(kc, k[None, :, None], (l, 0, idx, 0, 0))
  vc = jax.lax.dynamic_update_slice(vc, v[None, :, None], (l, 0, idx, 0, 0))
  kl, vl = kc[l], vc[l]
  s = jnp.einsum("bnh,bsnh->bns", q, kl,
                 preferred_element_type=jnp.float32) / np.sqrt(H)
  s = jnp.where(jnp.arange(kl.shape[1])[None, None] <= idx, s, -1e30)
  a = jnp.einsum("bns,bsnh->bnh", jax.nn.softmax(s, -1).astype(x.dtype),
                 vl).reshape(b, D)
  x = x + a @ w["wo"]
  h = rms(x)
  return x + (jax.nn.silu(h @ w["wg"]) * (h @ w["wu"])) @ w["wd"], kc, vc


def run(variant, b, s=2048, p=1024, steps=64):
  key = jax.random.key(0)
  stacked = variant != "unrolled_lists"
  if stacked:
    w = {n: jax.random.normal(jax.random.fold_in(key, i), (L,) + shp,
                              jnp.bfloat16) * 0.02
         for i, (n, shp) in enumerate(NAMES.items())}
    kc = jnp.zeros((L, b, s, N, H), jnp.bfloat16)
    vc = jnp.zeros_like(kc)
  else:
    w = [{n: jax.random.normal(jax.random.fold_in(key, 100 * l + i), shp,
                               jnp.bfloat16) * 0.02
          for i, (n, shp) in enumerate(NAMES.items())} for l in range(L)]
    kc = [jnp.zeros((b, s, N, H), jnp.bfloat16) for _ in range(L)]
    vc = [jnp.zeros_like(c) for c in kc]
  emb = jax.random.normal(key, (V, D), jnp.bfloat16) * 0.02
  head = jax.random.normal(key, (D, V), jnp.bfloat16) * 0.02

  @functools.partial(jax.jit, donate_argnums=(4, 5))
  def gen(w, emb, head, tok, kc, vc):
    def step(i, carry):
      tok, kc, vc = carry
      pos = jnp.full((b,), p + i, jnp.int32)
      x = emb[tok]
      if variant == "unrolled_lists":
        kc, vc = list(kc), list(vc)
        for l in range(L):
          x, kc[l], vc[l] = layer(x, w[l], kc[l], vc[l], pos)
      elif variant == "unrolled_stacked":
        for l in range(L):
          wl = {n: a[l] for n, a in w.items()}
          x, kc, vc = layer_stacked_cache(x, wl, kc, vc, pos, l)
      elif variant == "fori_stacked":
        def body(l, c):
          x, kc, vc = c
          wl = {n: a[l] for n, a in w.items()}
          return layer_stacked_cache(x, wl, kc, vc, pos, l)
        x, kc, vc = jax.lax.fori_loop(0, L, body, (x, kc, vc))
      else:
        def body(x, lw):
          wl, k1, v1 = lw
          x, k1, v1 = layer(x, wl, k1, v1, pos)
          return x, (k1, v1)
        x, (kc, vc) = jax.lax.scan(body, x, (w, kc, vc))
      logits = rms(x) @ head
      return jnp.argmax(logits, -1).astype(jnp.int32), kc, vc
    return jax.lax.fori_loop(0, steps, step, (tok, kc, vc))

  tok = jnp.zeros((b,), jnp.int32)
  t0 = time.perf_counter()
  out = gen(w, emb, head, tok, kc, vc)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  ts = []
  for _ in range(3):
    _, kc, vc = out
    t = time.perf_counter()
    out = gen(w, emb, head, tok, kc, vc)
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t)
  ms = float(np.median(ts)) / steps * 1e3
  wbytes = 2 * (L * (4 * D * D + 3 * D * F) + 2 * V * D)
  kvbytes = 2 * 2 * L * b * (p + steps // 2) * N * H
  floor = (wbytes + kvbytes) / HBM * 1e3
  print(f"{variant:17s} B={b:2d}: {ms:6.2f} ms/token, floor {floor:.2f},"
        f" {floor / ms:.2f} of floor, first call {compile_s:.1f} s"
        f" [XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}]", flush=True)


if __name__ == "__main__":
  print(jax.__version__, jax.devices()[0].device_kind, flush=True)
  batches = [int(a) for a in sys.argv[1:]] or [1]
  for batch in batches:
    for var in ("unrolled_lists", "unrolled_stacked", "fori_stacked",
                "scan_stacked"):
      try:
        run(var, batch)
      except Exception as e:  # pylint: disable=broad-except
        print(var, batch, "failed", type(e).__name__, str(e)[:300],
              flush=True)
