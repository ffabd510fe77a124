"""A packed model's decode step run two ways, for tests: the run layout's
fused q/k/v (`decode_qkv`, interpreted) against the op-by-op decode."""

import jax
import numpy as np

from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout


def fused_and_unfused_decode(real, config, options, tokens, slots: int):
  """Prefills tokens[:, :-1] into a per-layer KV4 cache of `slots`, then
  decodes tokens[:, -1:] with the fused layout ('interpret' kernels, which
  must reach `decode_qkv`) and with the unfused one ('xla').

  Returns:
    ((logits, cache) fused, (logits, cache) unfused).
  """
  unfused = run_layout.unstack_layers(real)
  fused = run_layout.unstack_layers(real, fuse=True)
  cache = kv_cache.cache_for(config, tokens.shape[0], slots, packed=True,
                             per_layer=True)
  _, cache = model.forward(unfused, tokens[:, :-1], config, cache=cache,
                           options=options)
  step = lambda p, k: model.forward(p, tokens[:, -1:], config, cache=cache,
                                    options=options, kernels=k)
  assert "decode_qkv" in str(jax.make_jaxpr(
      lambda p: step(p, "interpret")[0])(fused))
  return step(fused, "interpret"), step(unfused, "xla")


def assert_same_caches(got, want, scale_rtol: float) -> None:
  """Codes and zero points equal; f32 scales within `scale_rtol` (the head
  Hadamard's f32 sums run in another order in the kernel's dot)."""
  for got_c, want_c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    got_c, want_c = np.asarray(got_c), np.asarray(want_c)
    if got_c.dtype == np.float32:
      np.testing.assert_allclose(got_c, want_c, rtol=scale_rtol, atol=0)
    else:
      np.testing.assert_array_equal(got_c, want_c)
