"""Jitted batched generation: one prefill, then a `lax.while_loop` decode.

Prompts are left-padded to a shape bucket (batch and prompt length rounded
up to powers of two), so calls with similar prompts reuse one compiled
program. Sampling knobs (temperature, top-k, top-p) are traced values, not
static ones: changing them does not recompile.
"""

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout
from quarot_jax import sharding
from quarot_jax.config import LlamaConfig

# Incremented each time `_generate_core` is traced (tests check reuse).
TRACE_COUNT = 0


def _bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: f32[B, V].
    key: a `jax.random.key`.
    temperature: f32[]; 0 means greedy (argmax).
    top_k: int32[]; keep the k most likely tokens (0 keeps all).
    top_p: f32[]; keep the smallest set whose probability reaches top_p.

  Returns:
    int32[B].
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V], descending
  vocab = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take(ordered, k - 1, axis=-1)[:, None]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each
  keep_sorted = before < top_p
  # The smallest logit still kept by top-p.
  p_cut = jnp.min(jnp.where(keep_sorted, ordered, jnp.inf), axis=-1)[:, None]
  masked = jnp.where((scaled >= kth) & (scaled >= p_cut), scaled, -jnp.inf)
  sampled = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def _split_over_devices(params) -> bool:
  """Whether some param is split over devices (`sharding.shard_params`)."""
  return any(not leaf.sharding.is_fully_replicated
             for leaf in jax.tree.leaves(params)
             if isinstance(leaf, jax.Array))


def _place_on_mesh(params, config: LlamaConfig, mesh: jax.sharding.Mesh):
  """Params placed Megatron style on `mesh` (`sharding.param_shardings`).

  Leaves already on their sharding are kept as they are (no copy).

  Raises:
    ValueError: the mesh has no 'tp' axis, or a size that tensor
      parallelism splits (heads, kv heads, FFN, vocabulary, or a packed
      weight's axis) is not divisible by its tp; the message names it.
  """
  try:
    shardings = sharding.param_shardings(params, mesh, config=config)
  except ValueError as e:
    raise ValueError(f"cannot split the model over mesh"
                     f" {dict(mesh.shape)}: {e}") from None

  def place(x, s):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
      return x
    return jax.device_put(x, s)

  return jax.tree.map(place, params, shardings)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens",
                                             "options", "kernels",
                                             "cache_dtype", "fuse", "mesh"))
def _generate_core(params, tokens, start, key, temperature, top_k, top_p,
                   eos_ids, pad_id, *, config: LlamaConfig,
                   max_new_tokens: int, options: model.RunOptions,
                   kernels: kernels_lib.Kernels, cache_dtype,
                   fuse: bool = True,
                   mesh: jax.sharding.Mesh | None = None):
  """Prefill + decode loop. Returns int32[B, max_new_tokens].

  With `kernels.layer_loop == 'unrolled'` (GPUs) the layers run unrolled
  over per-layer weights and caches (`run_layout.unstack_layers`, sliced once
  here, before the loop), so a decode step reads each weight once and
  updates each layer's cache in place; with `fuse`, q/k/v and gate/up run
  as one matmul each (`run_layout.fuse_projections`). Sharded params are not
  fused: concatenating column-parallel shards would move weights between
  devices.

  With a `mesh`, the KV cache is created split by kv heads
  (`sharding.cache_shardings`) and every decode step's new cache is pinned
  to the same placement, so it never gathers; the forward runs packed
  linears and KV4 attention per shard (`model.forward(..., mesh=)`).
  """
  global TRACE_COUNT
  TRACE_COUNT += 1
  batch, prompt_len = tokens.shape
  unrolled = kernels.layer_loop == "unrolled"
  if unrolled:
    params = run_layout.unstack_layers(params, fuse=fuse)
  cache = kv_cache.cache_for(config, batch, prompt_len + max_new_tokens,
                             dtype=cache_dtype, start=start,
                             packed=model.uses_kv4_cache(params, options),
                             per_layer=unrolled)
  keep_sharded = lambda c: c
  if mesh is not None:
    keep_sharded = lambda c: jax.lax.with_sharding_constraint(
        c, sharding.cache_shardings(c, mesh))
  cache = keep_sharded(cache)
  logits, cache = model.forward(params, tokens, config, cache=cache,
                                options=options, kernels=kernels, mesh=mesh,
                                last_only=True)
  cache = keep_sharded(cache)
  key, sub = jax.random.split(key)
  first = sample_next(logits[:, -1], sub, temperature, top_k, top_p)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def cond(state):
    i, _, _, _, _, done = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tok, cache, key, out, done = state
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    done = done | jnp.isin(tok, eos_ids)
    logits, cache = model.forward(params, tok[:, None], config, cache=cache,
                                  options=options, kernels=kernels, mesh=mesh)
    cache = keep_sharded(cache)
    key, sub = jax.random.split(key)
    tok = sample_next(logits[:, -1], sub, temperature, top_k, top_p)
    return i + 1, tok, cache, key, out, done

  state = (jnp.int32(0), first, cache, key, out, done)
  return jax.lax.while_loop(cond, body, state)[4]


def _check_args(config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
                max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, pad_id: int) -> None:
  """Raises ValueError naming the first bad argument of `generate_tokens`."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise ValueError(f"{max_new_tokens=} must be a positive int")
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"{temperature=} must be a finite number >= 0"
                     " (0: greedy)")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"{top_k=} must be an int >= 0 (0: keep all)")
  if not 0 < top_p <= 1:  # also False for NaN
    raise ValueError(f"{top_p=} must be in (0, 1]")
  vocab, limit = config.vocab_size, config.max_position_embeddings
  if not 0 <= pad_id < vocab:
    raise ValueError(f"{pad_id=} must be a token id in [0, {vocab=})")
  if len(prompts) == 0:
    raise ValueError("no prompts: give at least one")
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"prompt {i} must be a non-empty list of token ids;"
                       f" got shape {ids.shape}: every prompt must have at"
                       " least one token")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {i} holds {ids.dtype} values; token ids are"
                       " ints")
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
      raise ValueError(f"prompt {i} has token id {int(bad[0])} outside"
                       f" [0, {vocab=})")
    if len(ids) + max_new_tokens > limit:
      raise ValueError(
          f"prompt {i} has {len(ids)} tokens; with {max_new_tokens=} that"
          f" is {len(ids) + max_new_tokens} positions, more than the model's"
          f" max_position_embeddings={limit}")


def generate_tokens(params: Any, config: LlamaConfig,
                    prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eos_ids: Sequence[int] | None = None, pad_id: int = 0,
                    options: model.RunOptions = model.FLOAT,
                    kernels: "str | kernels_lib.Kernels | None" = None,
                    cache_dtype: Any = None,
                    mesh: jax.sharding.Mesh | None = None
                    ) -> list[list[int]]:
  """Generates token ids for a batch of tokenized prompts.

  Args:
    params: model params.
    config: the model's config.
    prompts: one list of token ids per prompt (non-empty).
    max_new_tokens: tokens to generate per prompt (at most).
    temperature: 0 for greedy decoding.
    top_k: keep the k most likely tokens when sampling (0: all).
    top_p: nucleus sampling mass (1.0: all).
    seed: sampling seed.
    eos_ids: stop tokens (default: the config's EOS ids).
    pad_id: token used for left padding.
    options: rotation/quantization behaviour of the forward.
    kernels: which kernels run (`kernels.SETTINGS`, None = 'auto', or a
      resolved `kernels.Kernels`); resolved once, here.
    cache_dtype: KV cache dtype (default: the embedding dtype).
    mesh: a 1-D mesh with axis 'tp' (`sharding.make_mesh`) to run tensor
      parallel on, or None (one device, or params as they are placed).
      The params are placed with `sharding.param_shardings` (leaves already
      there are not copied), the KV cache [.., B, S, K, H] (or KV4) is
      created split over K and stays split through the decode. Packed
      linears and the packed KV4 attention run their kernels (Pallas or
      XLA, as `kernels` says) per shard inside `shard_map`, so no weight or
      cache is gathered; their o_proj/down_proj quantize per shard, so
      `options.row_groups` must equal the mesh's tp. GSPMD partitions the
      rest.

  Returns:
    For each prompt, the generated ids, ending at (and including) the first
    EOS if one was produced.

  Raises:
    ValueError: an empty prompt, a token id outside [0, vocab_size), a
      prompt plus `max_new_tokens` longer than max_position_embeddings, or
      bad sampling values (negative or NaN temperature, ...), or a
      `kernels` setting this platform cannot run, or (with `mesh`) a size
      not divisible by its tp (the message names it), or packed params with
      `options.row_groups` not its tp.
  """
  kernels = kernels_lib.resolve(kernels)
  params, _ = model.unwrap(params)  # Flax variables too
  _check_args(config, prompts, max_new_tokens=max_new_tokens,
              temperature=temperature, top_k=top_k, top_p=top_p,
              pad_id=pad_id)
  if mesh is not None:
    params = _place_on_mesh(params, config, mesh)
  eos = tuple(config.eos_token_ids if eos_ids is None else eos_ids) or (-1,)
  batch = _bucket(len(prompts), 1)
  length = _bucket(max(len(p) for p in prompts), 8)
  tokens = np.full((batch, length), pad_id, np.int32)
  start = np.full((batch,), length - 1, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    start[row] = length - len(prompt)
  # Filler rows repeat the last token of prompt 0 and are dropped below.
  tokens[len(prompts):, -1] = prompts[0][-1]
  if cache_dtype is None:
    cache_dtype = params["embed_tokens"]["embedding"].dtype
  tokens, start = jnp.asarray(tokens), jnp.asarray(start)
  if mesh is not None:  # [B, T] and [B], replicated on the mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tokens, start = jax.device_put((tokens, start), replicated)
  out = _generate_core(
      params, tokens, start,
      jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k),
      jnp.float32(top_p), jnp.asarray(eos, jnp.int32), jnp.int32(pad_id),
      config=config, max_new_tokens=max_new_tokens, options=options,
      kernels=kernels, cache_dtype=jnp.dtype(cache_dtype),
      fuse=not _split_over_devices(params), mesh=mesh)
  results = []
  for row in np.asarray(out)[:len(prompts)].tolist():
    ids = []
    for tok in row:
      ids.append(tok)
      if tok in eos:
        break
    results.append(ids)
  return results


def generate(params: Any, config: LlamaConfig, tokenizer: Any,
             prompts: Sequence[str] | str, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, options: model.RunOptions = model.FLOAT,
             kernels: "str | kernels_lib.Kernels | None" = None,
             mesh: jax.sharding.Mesh | None = None) -> list[str]:
  """Generates text for a batch of prompts.

  Args:
    params: model params (float, rotated, or quantized).
    config: the model's config.
    tokenizer: a Hugging Face tokenizer (`encode`/`decode`).
    prompts: a prompt or a list of prompts.
    max_new_tokens: tokens to generate per prompt (at most).
    temperature: 0 for greedy decoding.
    top_k: keep the k most likely tokens when sampling (0: all).
    top_p: nucleus sampling mass (1.0: all).
    seed: sampling seed.
    options: rotation/quantization behaviour of the forward.
    kernels: which kernels run (see `generate_tokens`).
    mesh: a mesh with axis 'tp' to run tensor parallel on, or None (see
      `generate_tokens`).

  Returns:
    The generated continuation of each prompt (prompt not included).

  Raises:
    ValueError: as `generate_tokens`.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  ids = [tokenizer.encode(p) for p in prompts]
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = config.eos_token_ids[0] if config.eos_token_ids else 0
  eos = set(config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    eos.add(tokenizer.eos_token_id)
  out = generate_tokens(params, config, ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, eos_ids=sorted(eos), pad_id=pad_id,
                        options=options, kernels=kernels, mesh=mesh)
  return [tokenizer.decode([t for t in row if t not in eos],
                           skip_special_tokens=True) for row in out]
