"""Does the real int4 path compute what simulated quantization computes?

QuaRot's accuracy figures come from simulated (fake) quantization; the
packed path runs integer kernels and a packed KV4 cache. This module
compares the two on the same quantization: greedy generations, and the
argmax of the packed path teacher-forced on the simulated path's tokens
(which stays meaningful after the first divergence of two free runs).
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax import generation
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax.config import LlamaConfig


def greedy_agreement(simulated: Any, packed: Any, config: LlamaConfig,
                     prompts: Sequence[Sequence[int]], *,
                     options: model.RunOptions, kernels=None,
                     max_new_tokens: int = 256,
                     reference_tokens: Sequence[Sequence[int]] | None = None
                     ) -> dict[str, Any]:
  """Greedy tokens of both paths, compared position by position.

  Args:
    simulated: params from `quarot.quantize(..., packed=False)`.
    packed: params from `quarot.quantize(..., packed=True)` (same config).
    config: the model config.
    prompts: token-id prompts.
    options: the `RunOptions` both were made with.
    kernels: which kernels run (a `kernels.SETTINGS` word, None = 'auto',
      or a resolved `kernels.Kernels`).
    max_new_tokens: tokens generated per prompt.
    reference_tokens: `simulated`'s greedy tokens for these prompts when
      already generated (with the same settings), so that comparing several
      models against it generates them once; None: generated here.

  Returns:
    {'free_running': fraction of generated positions where the two greedy
     runs agree, 'teacher_forced': fraction of positions where the packed
     path's argmax, fed the simulated path's tokens, equals the simulated
     token, 'positions': positions compared, 'first_divergence': per
     prompt, the first differing position or None}.
  """
  kernels = kernels_lib.resolve(kernels)
  want = reference_tokens
  if want is None:
    want = generation.generate_tokens(simulated, config, prompts,
                                      max_new_tokens=max_new_tokens,
                                      options=options, kernels=kernels)
  got = generation.generate_tokens(packed, config, prompts,
                                   max_new_tokens=max_new_tokens,
                                   options=options, kernels=kernels)
  free, forced, total, first = 0, 0, 0, []
  for prompt, w, g in zip(prompts, want, got):
    n = min(len(w), len(g))
    same = np.asarray(w[:n]) == np.asarray(g[:n])
    free += int(same.sum())
    first.append(None if same.all() else int(np.argmin(same)))
    tokens = jnp.asarray([list(prompt) + list(w)], jnp.int32)
    cache = kv_cache.cache_for(config, 1, tokens.shape[1],
                               packed=model.uses_kv4_cache(packed, options))
    logits, _ = model.forward(packed, tokens, config, cache=cache,
                              options=options, kernels=kernels)
    pred = np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1))
    forced += int((pred == np.asarray(w)).sum())
    total += len(w)
  return {"free_running": free / total, "teacher_forced": forced / total,
          "positions": total, "first_divergence": first}


def ulp_perturbed(params: Any, key: jax.Array) -> Any:
  """The control: every decoder kernel times (1 ± 2^-23), a one-ulp change.

  Running `greedy_agreement(simulated, ulp_perturbed(simulated, key), ...)`
  shows how far two runs of the *same* simulated model drift apart from
  rounding noise alone (4-bit activation codes near a rounding tie flip and
  the flips cascade), the yardstick for the packed path's agreement.

  Args:
    params: float params (kernels [L, in, out]).
    key: a `jax.random.key`.

  Returns:
    New params; only the decoder `kernel` leaves change.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, a) in enumerate(leaves):
    if getattr(path[-1], "key", None) == "kernel" and path[0].key == "layers":
      sign = jax.random.rademacher(jax.random.fold_in(key, i), a.shape,
                                   jnp.float32)
      a = jnp.asarray(a, jnp.float32) * (1 + sign * 2.0**-23)
    out.append(a)
  return jax.tree.unflatten(treedef, out)
