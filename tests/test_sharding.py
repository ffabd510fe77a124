"""Tensor parallelism: placements, the block-diagonal rotation, and sharded
runs on 3 CPU devices.

jax fixes its device count when it starts, so the sharded checks run once in
a subprocess (`python -m tests.test_sharding` with
XLA_FLAGS=--xla_force_host_platform_device_count=3; `_sharded_checks`) that
prints its measurements as JSON; the tests below assert on them.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from quarot_jax import generation
from quarot_jax import hadamard
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import qlinear
from quarot_jax import quant
from quarot_jax import quarot
from quarot_jax import rotation
from quarot_jax import run_layout
from quarot_jax import sharding
from quarot_jax.config import LlamaConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICES = 3
# Heads, kv heads, FFN and vocabulary divide by 2 and 3; N·H = F = 96 and
# their halves and thirds (48 = 4·12, 32) have Hadamard matrices.
CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=1, num_attention_heads=12,
                     num_key_value_heads=6, head_dim=8,
                     attention_bias=True, tie_word_embeddings=True)
W4A4KV4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                              w_method="rtn")
_COLLECTIVE = re.compile(r"=\s*\S+\s+(all-reduce|all-gather|all-to-all|"
                         r"collective-permute|reduce-scatter)(?:-start)?\(")
# (operand type, collective) pairs, e.g. ('u8[2,3,9,4]', 'all-gather').
_TYPED_COLLECTIVE = re.compile(
    r"=\s*(\w+\[[\d,]*\])\S*\s+(all-reduce|all-gather|all-to-all|"
    r"collective-permute|reduce-scatter)(?:-start)?\(")


_init = jax.jit(model.init_params, static_argnames=("config",))
_forward = jax.jit(model.forward, static_argnames=("config", "options"))
_forward_kernels = jax.jit(model.forward,
                           static_argnames=("config", "options", "kernels"))


def _params(config=CONFIG):
  return _init(config, jax.random.key(0))


def _tokens(t=6):
  return jax.random.randint(jax.random.key(1), (2, t), 0, CONFIG.vocab_size)


def _rotated(params, tp):
  """Block-diagonal QuaRot rotation for tp shards and its run options."""
  p = rotation.rotate(params, CONFIG, jax.random.key(2), tp=tp)
  return p, dataclasses.replace(rotation.ROTATED, had_blocks=tp)


def _w4a4kv4(params, tp, *, packed, w_groupsize=None, w_asym=False):
  """W4A4KV4 (RTN) params after the block-diagonal rotation, and options
  (packed: o_proj/down_proj quantize per shard, `row_groups=tp`);
  `w_groupsize`: weight scales per group of that many inputs; `w_asym`:
  asymmetric weights and float activations (W4A16KV4)."""
  p, _ = _rotated(params, tp)
  qconfig = dataclasses.replace(W4A4KV4, w_groupsize=w_groupsize,
                                w_asym=w_asym, a_bits=16 if w_asym else 4)
  options = dataclasses.replace(qconfig.run_options(CONFIG.head_dim),
                                had_blocks=tp, row_groups=tp if packed else 1)
  if packed:
    qarrays = qlinear.quantize_weights_rtn(p, quarot.LINEARS,
                                           qconfig.weight_spec)
    return qlinear.pack_params(p, qarrays), options
  return quarot.rtn_quantize_params(p, qconfig.weight_spec), options


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


# --- On one device ---------------------------------------------------------


def test_param_specs_megatron_layout():
  params = jax.eval_shape(lambda: _params(
      dataclasses.replace(CONFIG, tie_word_embeddings=False)))
  specs = sharding.param_specs(params, 2)
  attn, mlp = specs["layers"]["self_attn"], specs["layers"]["mlp"]
  column, row = P(None, None, "tp"), P(None, "tp", None)
  for name in ("q_proj", "k_proj", "v_proj"):
    assert attn[name]["kernel"] == column
    assert attn[name]["bias"] == P(None, "tp")
  assert mlp["gate_proj"]["kernel"] == mlp["up_proj"]["kernel"] == column
  assert attn["o_proj"]["kernel"] == mlp["down_proj"]["kernel"] == row
  assert specs["embed_tokens"]["embedding"] == P("tp", None)
  assert specs["lm_head"]["kernel"] == P(None, "tp")
  assert specs["layers"]["input_layernorm"]["scale"] == P()
  assert specs["norm"]["scale"] == P()
  # Per-layer params: the same placements without the L axis.
  per_layer = sharding.param_specs(
      jax.eval_shape(run_layout.unstack_layers, params), 2)
  assert per_layer["layers"][0]["mlp"]["down_proj"]["kernel"] == P("tp", None)
  assert per_layer["layers"][0]["self_attn"]["q_proj"]["bias"] == P("tp")
  # Flax variables come back wrapped.
  assert sharding.param_specs({"params": params}, 2)["params"]["norm"] == {
      "scale": P()}


def test_param_specs_packed():
  packed = jax.eval_shape(lambda: _w4a4kv4(_params(), 1, packed=True)[0])
  specs = sharding.param_specs(packed, 2)
  attn, mlp = specs["layers"]["self_attn"], specs["layers"]["mlp"]
  # qweight [L, out, in // 2]: column parallel on out, row parallel on in.
  assert attn["q_proj"]["qweight"] == P(None, "tp", None)
  assert attn["q_proj"]["wscale"] == P(None, "tp")
  assert mlp["up_proj"]["qweight"] == P(None, "tp", None)
  assert mlp["down_proj"]["qweight"] == P(None, None, "tp")
  assert mlp["down_proj"]["wscale"] == P()
  assert attn["o_proj"]["qweight"] == P(None, None, "tp")


def test_param_specs_packed_group_scales():
  packed = jax.eval_shape(lambda: _w4a4kv4(_params(), 1, packed=True,
                                           w_groupsize=16)[0])
  specs = sharding.param_specs(packed, 2)
  attn, mlp = specs["layers"]["self_attn"], specs["layers"]["mlp"]
  # wscale [L, out, G]: column parallel on out, row parallel on G (with in).
  assert packed["layers"]["self_attn"]["q_proj"]["wscale"].shape == (1, 96, 4)
  assert attn["q_proj"]["wscale"] == P(None, "tp", None)
  assert mlp["gate_proj"]["wscale"] == P(None, "tp", None)
  assert mlp["down_proj"]["wscale"] == P(None, None, "tp")
  assert attn["o_proj"]["wscale"] == P(None, None, "tp")
  assert mlp["down_proj"]["qweight"] == P(None, None, "tp")
  # Per layer (unstacked): the same axes, counted from the end.
  per_layer = sharding.param_specs(
      jax.eval_shape(run_layout.unstack_layers, packed), 2)
  assert per_layer["layers"][0]["mlp"]["down_proj"]["wscale"] == P(None, "tp")
  assert per_layer["layers"][0]["self_attn"]["k_proj"]["wscale"] == P(
      "tp", None)
  # down_proj's G = 96 / 16 = 6 groups do not split in 4 (its bytes do).
  with pytest.raises(ValueError, match=r"down_proj/wscale has shape"
                     r" \(1, 64, 6\): axis -1 of size 6 must be divisible"
                     r" by tp=4"):
    sharding.param_specs(packed, 4)


def test_cache_specs_float_and_kv4():
  def specs(**kw):
    cache = jax.eval_shape(lambda: kv_cache.cache_for(CONFIG, 2, 16, **kw))
    return sharding.cache_specs(cache, 3)

  s = specs()  # [L, B, S, K, H]
  assert s.k == s.v == P(None, None, None, "tp", None)
  assert s.start == s.end == P()
  s = specs(per_layer=True)  # L x [B, S, K, H]
  assert s.k == (P(None, None, "tp", None),)
  s = specs(packed=True)  # codes [L, B, K, S, H // 2], scale [L, B, K, S]
  assert s.k.codes == P(None, None, "tp", None, None)
  assert s.v.scale == s.v.zero == P(None, None, "tp", None)
  s = specs(packed=True, per_layer=True)
  assert s.k[0].codes == P(None, "tp", None, None)
  assert s.k[0].zero == P(None, "tp", None)


def test_divisibility_errors_name_the_value():
  with pytest.raises(ValueError, match="num_attention_heads=12 .* tp=5"):
    sharding.check_config(CONFIG, 5)
  with pytest.raises(ValueError, match="num_key_value_heads=6 .* tp=4"):
    sharding.check_config(CONFIG, 4)
  with pytest.raises(ValueError, match="intermediate_size=98 .* tp=4"):
    sharding.check_config(dataclasses.replace(
        CONFIG, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=98), 4)
  with pytest.raises(ValueError, match="vocab_size=97 .* tp=2"):
    sharding.check_config(dataclasses.replace(CONFIG, vocab_size=97), 2)
  with pytest.raises(ValueError, match="embed_tokens/embedding .* tp=5"):
    sharding.param_specs(jax.eval_shape(_params), 5)
  cache = jax.eval_shape(lambda: kv_cache.cache_for(CONFIG, 1, 4))
  with pytest.raises(ValueError, match=r"kv heads \(axis -2, 6\) .* tp=4"):
    sharding.cache_specs(cache, 4)


def test_make_mesh():
  mesh = sharding.make_mesh(1)
  assert mesh.shape == {"tp": 1}
  with pytest.raises(ValueError, match="tp=0 must be a positive int"):
    sharding.make_mesh(0)


@pytest.mark.parametrize("tp", [2, 3])
def test_block_diagonal_rotation_is_invariant(tp):
  params, tokens = _params(), _tokens()
  want, _ = _forward(params, tokens, CONFIG)
  rotated, options = _rotated(params, tp)
  got, _ = _forward(rotated, tokens, CONFIG, options=options)
  assert _rel(got, want) <= 1e-4
  # The block-diagonal fold needs the block-diagonal online transform.
  full, _ = _forward(rotated, tokens, CONFIG, options=rotation.ROTATED)
  assert _rel(full, want) > 1e-2


def test_row_groups_packed_equals_simulated():
  # One device: packed o_proj/down_proj with row_groups=2 (the kernels on
  # each half of `in`, summed) compute the simulated model whose per-token
  # activation groups are those halves.
  params, tokens = _params(), _tokens()
  packed, options = _w4a4kv4(params, 2, packed=True)
  assert options.row_groups == 2
  run = lambda p, o: _forward_kernels(p, tokens, CONFIG, options=o,
                                      kernels=kernels_lib.resolve("xla"))[0]
  got = run(packed, options)
  want = run(qlinear.dequantize_params(packed), options)
  assert _rel(got, want) < 1e-4
  # Not vacuous: per-token scales over all of `in` give other logits.
  per_token = dataclasses.replace(options, row_groups=1)
  assert _rel(run(packed, per_token), got) > 1e-3
  assert _rel(run(qlinear.dequantize_params(packed), per_token), want) > 1e-3


def test_packed_group_scales_on_a_one_device_mesh():
  # The shard_map path with group scales (one shard) equals the model
  # without a mesh; the sharded runs (tp = 2) are `_sharded_checks`'.
  params = _params()
  qconfig = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                                w_groupsize=32)
  packed, options = quarot.quantize(params, CONFIG, qconfig, packed=True,
                                    progress=False)
  assert qlinear.is_grouped(packed["layers"]["mlp"]["down_proj"])
  want, _ = model.forward(packed, _tokens(), CONFIG, options=options,
                          kernels="xla")
  got, _ = model.forward(packed, _tokens(), CONFIG, options=options,
                         kernels="xla", mesh=sharding.make_mesh(1))
  assert _rel(got, want) < 1e-6


def test_packed_asymmetric_w4a16_on_a_one_device_mesh():
  # Zero points of asymmetric weights go through shard_map as their scales.
  params = _params()
  qconfig = quarot.QuaRotConfig(w_bits=4, w_asym=True)
  packed, options = quarot.quantize(params, CONFIG, qconfig, packed=True,
                                    progress=False)
  assert "wzero" in packed["layers"]["mlp"]["down_proj"]
  specs = sharding.param_specs(packed, 2)["layers"]
  for block, name in (("mlp", "down_proj"), ("self_attn", "q_proj")):
    assert specs[block][name]["wzero"] == specs[block][name]["wscale"]
  want, _ = model.forward(packed, _tokens(), CONFIG, options=options,
                          kernels="xla")
  got, _ = model.forward(packed, _tokens(), CONFIG, options=options,
                         kernels="xla", mesh=sharding.make_mesh(1))
  assert _rel(got, want) < 1e-6
  sim, _ = model.forward(qlinear.dequantize_params(packed), _tokens(),
                         CONFIG, options=options, kernels="xla")
  assert _rel(got, sim) < 1e-4


def test_packed_on_mesh_needs_row_groups_equal_to_tp():
  packed, options = _w4a4kv4(_params(), 1, packed=True)
  options = dataclasses.replace(options, row_groups=2)
  with pytest.raises(ValueError, match=r"row_groups=2\) must equal the"
                     r" mesh's tp=1"):
    model.forward(packed, _tokens(), CONFIG, options=options, kernels="xla",
                  mesh=sharding.make_mesh(1))


# --- Sharded, in a subprocess with 3 CPU devices ---------------------------


def _collectives(fn, *args) -> list[str]:
  """Collective ops in the compiled HLO of jit(fn)(*args), in order."""
  return _COLLECTIVE.findall(jax.jit(fn).lower(*args).compile().as_text())


def _sharded_checks() -> dict:
  """Runs every sharded check; returns their measurements (JSON-able)."""
  out, start = {}, time.perf_counter()
  try:
    sharding.make_mesh(_DEVICES + 1)
  except ValueError as e:
    out["mesh_error"] = str(e)
  fwd, params, tokens = _forward, _params(), _tokens()

  # Float logits, tp = 2 and 3 (tied embeddings: the head is vocab-sharded).
  want, _ = fwd(params, tokens, CONFIG)
  for tp in (2, 3):
    mesh = sharding.make_mesh(tp)
    got, _ = sharding.forward(sharding.shard_params(params, mesh), tokens,
                              CONFIG, mesh=mesh)
    out[f"float_tp{tp}"] = _rel(got, want)
  out["seconds_float"] = time.perf_counter() - start

  # Prefill + 2 decode steps through a sharded cache: simulated W4A4KV4
  # (stacked params, float cache) and packed W4A4KV4 (per-layer params,
  # packed KV4 cache), each against the same run unsharded.
  # The packed runs quantize o_proj/down_proj inputs per shard on the
  # mesh; unsharded, `row_groups=2` computes the same groups. Their kernels
  # run per shard in shard_map: the XLA references, and the Pallas ones in
  # interpret mode (prefill + 1 decode step: interpreting is slow).
  mesh = sharding.make_mesh(2)
  for name, packed, kernels, steps, groups in (
      ("sim", False, "xla", 3, None), ("packed", True, "xla", 3, None),
      ("grouped", True, "xla", 3, 16), ("asym", True, "xla", 3, None),
      ("interpret", True, "interpret", 2, None)):
    kernels = kernels_lib.resolve(kernels)
    p, options = _w4a4kv4(params, 2, packed=packed, w_groupsize=groups,
                          w_asym=name == "asym")
    assert (name == "asym") == ("wzero" in p["layers"]["mlp"]["down_proj"])
    assert not groups or qlinear.is_grouped(p["layers"]["mlp"]["down_proj"])
    if packed:
      p = run_layout.unstack_layers(p)
    cache = kv_cache.cache_for(CONFIG, 2, 9, packed=packed, per_layer=packed)
    sp, scache = sharding.shard_params(p, mesh), sharding.shard_cache(
        cache, mesh)
    step, rels = tokens, []
    for _ in range(steps):
      want, cache = _forward_kernels(p, step, CONFIG, cache=cache,
                                     options=options, kernels=kernels)
      got, scache = sharding.forward(sp, step, CONFIG, mesh=mesh,
                                     cache=scache, options=options,
                                     kernels=kernels)
      rels.append(_rel(got, want))
      step = jnp.argmax(want[:, -1:], -1).astype(jnp.int32)
    out[f"{name}_steps"] = rels
    out[f"{name}_cache_kept"] = all(
        a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
            jax.tree.leaves(scache),
            jax.tree.leaves(sharding.cache_shardings(scache, mesh))))
    leaf = scache.k[0].codes if packed else scache.k
    out[f"{name}_cache_shard"] = list(leaf.addressable_shards[0].data.shape)
    out[f"seconds_{name}"] = time.perf_counter() - start

  # Collectives in one decoder layer (float, tp = 2): unrotated, rotated
  # with block-diagonal online Hadamards, and with full-width ones.
  x = jax.random.normal(jax.random.key(3), (2, 6, CONFIG.hidden_size))
  for name, (p, options) in (
      ("plain", (params, model.FLOAT)), ("block", _rotated(params, 2)),
      ("full", (_rotated(params, 2)[0], rotation.ROTATED))):
    layer = jax.tree.map(lambda a: a[0],
                         sharding.shard_params(p, mesh)["layers"])
    out[f"hlo_{name}"] = _collectives(
        lambda x, lp, o=options: model.decoder_layer(
            x, lp, config=CONFIG, options=o)[0], x, layer)

  # Packed W4A4KV4 on the mesh, Pallas kernels (interpret): a decode step
  # of one layer (per-layer params, KV4 cache) and the whole forward.
  kernels = kernels_lib.resolve("interpret")
  p, options = _w4a4kv4(params, 2, packed=True)
  sp = sharding.shard_params(run_layout.unstack_layers(p), mesh)
  cache = sharding.shard_cache(
      kv_cache.cache_for(CONFIG, 2, 9, packed=True, per_layer=True), mesh)
  x = jax.random.normal(jax.random.key(3), (2, 1, CONFIG.hidden_size))
  out["hlo_packed_layer"] = _collectives(
      lambda x, lp, kc, vc: model.decoder_layer(
          x, lp, config=CONFIG, options=options, kernels=kernels,
          k_cache=kc, v_cache=vc, positions=jnp.zeros((2, 1), jnp.int32),
          mask=jnp.ones((2, 1, 9), bool), write_at=jnp.int32(0),
          start=jnp.zeros((2,), jnp.int32), mesh=mesh)[:3],
      x, sp["layers"][0], cache.k[0], cache.v[0])
  for t in (6, 1):  # prefill, decode
    out[f"hlo_packed_forward_t{t}"] = _TYPED_COLLECTIVE.findall(
        jax.jit(lambda sp, tokens, c: sharding.forward(
            sp, tokens, CONFIG, mesh=mesh, cache=c, options=options,
            kernels=kernels)).lower(sp, tokens[:, :t], cache)
        .compile().as_text())
  out["packed_forward_pallas"] = "pallas_call" in str(jax.make_jaxpr(
      lambda sp, c: model.forward(sp, tokens[:, :1], CONFIG, cache=c,
                                  options=options, kernels=kernels,
                                  mesh=mesh))(sp, cache))
  out["seconds_hlo"] = time.perf_counter() - start

  # generate takes sharded params as they are (and does not fuse q/k/v,
  # gate/up across shards).
  prompts = [[1, 2, 3, 4], [5, 6]]
  out["generate"] = [
      generation.generate_tokens(p, CONFIG, prompts, max_new_tokens=3,
                                 eos_ids=[])
      for p in (params, sharding.shard_params(params, mesh))]
  out["split_over_devices"] = [
      generation._split_over_devices(p)  # pylint: disable=protected-access
      for p in (params, sharding.shard_params(params, mesh))]

  # generate(mesh=...) places the params and a head-sharded cache itself:
  # the tokens of one device (float; packed W4A4KV4: unsharded with the
  # XLA kernels, on the mesh with the Pallas ones per shard).
  out["generate_mesh"] = generation.generate_tokens(
      params, CONFIG, prompts, max_new_tokens=3, eos_ids=[], mesh=mesh)
  p, options = _w4a4kv4(params, 2, packed=True)
  out["generate_packed"] = [
      generation.generate_tokens(p, CONFIG, prompts, max_new_tokens=3,
                                 eos_ids=[], options=options, kernels=k,
                                 mesh=m)
      for k, m in (("xla", None), ("interpret", mesh))]
  sp = sharding.shard_params(params, mesh)
  place = generation._place_on_mesh  # pylint: disable=protected-access
  placed = place(sp, CONFIG, mesh)
  out["placed_not_copied"] = all(
      a is b for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(placed)))
  # The collectives of the mesh generate program (prompt bucket 8 + 3 new
  # tokens: the cache holds S = 11 positions) and their operand shapes.
  rep = jax.sharding.NamedSharding(mesh, P())
  hlo = generation._generate_core.lower(  # pylint: disable=protected-access
      sp, *jax.device_put((jnp.ones((2, 8), jnp.int32),
                           jnp.zeros((2,), jnp.int32)), rep),
      jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1),
      jnp.asarray([-1], jnp.int32), jnp.int32(0), config=CONFIG,
      max_new_tokens=3, options=model.FLOAT,
      kernels=kernels_lib.resolve("xla"), cache_dtype=jnp.dtype(jnp.float32),
      fuse=False, mesh=mesh).compile().as_text()
  out["generate_mesh_collective_shapes"] = re.findall(
      r"=\s*\w+\[([\d,]*)\]\S*\s+(?:all-reduce|all-gather|all-to-all|"
      r"collective-permute|reduce-scatter)(?:-start)?\(", hlo)
  bad = dataclasses.replace(CONFIG, num_key_value_heads=4)  # 4 % 3 != 0
  try:
    generation.generate_tokens(jax.eval_shape(lambda: _params(bad)), bad,
                               prompts, mesh=sharding.make_mesh(3))
  except ValueError as e:
    out["generate_mesh_error"] = str(e)
  out["seconds_generate"] = time.perf_counter() - start

  # Packed linears per shard in shard_map, Pallas kernels in interpret
  # mode: against the same kernels on each shard's slice, unsharded.
  out.update(_packed_linear_checks(mesh))

  # Weights created sharded equal model.init_params's.
  sp = sharding.init_params_sharded(CONFIG, jax.random.key(0), mesh)
  q = sp["layers"]["self_attn"]["q_proj"]["kernel"]
  want = params  # jitted too: eager ops round differently
  out["init_equal"] = bool(all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sp),
                                           jax.tree.leaves(want))))
  out["init_q_shard"] = list(q.addressable_shards[0].data.shape)
  return out


def _packed_linear_checks(mesh) -> dict:
  """`sharding.packed_linear` at tp = 2 (in = 64, out = 48, M = 6)."""
  kernels = kernels_lib.resolve("interpret")
  a_spec = quant.activation_spec(4)
  w = jax.random.normal(jax.random.key(4), (64, 48))
  p = qlinear.pack_weight(quant.quantize_weight(w, quant.QuantSpec(bits=4)))
  p["bias"] = jax.random.normal(jax.random.key(5), (48,))
  x = jax.random.normal(jax.random.key(6), (2, 3, 64))
  run = lambda x, p: qlinear.linear(x, p, a_spec=a_spec, online_hadamard=True,
                                    kernels=kernels)
  out = {}
  for parallel in ("column", "row"):
    fn = jax.jit(lambda x, p, parallel=parallel: sharding.packed_linear(
        x, p, mesh=mesh, parallel=parallel, a_spec=a_spec,
        online_hadamard=True, kernels=kernels))
    got = fn(x, p)
    if parallel == "column":
      want = run(x, p)
    else:  # Each half of `in` with its half of the packed bytes.
      want = p["bias"] + sum(
          run(x[..., 32 * i:32 * (i + 1)],
              {"qweight": p["qweight"][:, 16 * i:16 * (i + 1)],
               "wscale": p["wscale"]}) for i in range(2))
      # = block-diagonal Hadamard, per-token scales over each half.
      w_q = qlinear.dequantize_params({"layers": {"mlp": {"down_proj": {
          k: v[None] for k, v in p.items() if k != "bias"}}}})
      x_q = quant.fake_quant(hadamard.block_hadamard_transform(x, 2),
                             quant.activation_spec(4, group_size=32))
      out["row_vs_simulated"] = _rel(
          got, x_q @ w_q["layers"]["mlp"]["down_proj"]["kernel"][0]
          + p["bias"])
    out[f"{parallel}_linear"] = _rel(got, want)
    out[f"{parallel}_linear_shard"] = list(
        got.addressable_shards[0].data.shape)
    out[f"{parallel}_linear_hlo"] = _collectives(fn, x, p)
    out[f"{parallel}_linear_pallas"] = "pallas_call" in str(
        jax.make_jaxpr(fn)(x, p))
  return out


@pytest.fixture(scope="module")
def sharded():
  # LLVM's optimizations take ~90% of the compile time of these tiny
  # programs and do not change which collectives GSPMD inserts.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={_DEVICES}"
      " --xla_backend_optimization_level=0"
      " --xla_llvm_disable_expensive_passes=true"))
  proc = subprocess.run([sys.executable, "-m", "tests.test_sharding"],
                        cwd=_ROOT, env=env, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_make_mesh_needs_devices(sharded):
  assert "tp=4 needs 4 devices but jax sees 3" in sharded["mesh_error"]


@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_float_logits(sharded, tp):
  # Only the f32 summation order of o_proj/down_proj/the head differs.
  assert sharded[f"float_tp{tp}"] <= 1e-5


@pytest.mark.parametrize("name", ["sim", "packed", "grouped", "asym",
                                  "interpret"])
def test_sharded_w4a4kv4_prefill_and_decode(sharded, name):
  # grouped: packed with weight scales per 16 inputs, split with their
  # linears (column: on out; row: on the groups, with `in`). asym: W4A16KV4
  # with asymmetric weights, whose zero points shard as the scales (row
  # parallel: each shard subtracts its part, the psum adds them).
  assert all(r <= 1e-5 for r in sharded[f"{name}_steps"]), sharded
  assert len(sharded[f"{name}_steps"]) == (2 if name == "interpret" else 3)
  # The new cache stays split by kv heads: 6 heads, 3 per device.
  assert sharded[f"{name}_cache_kept"]
  assert sharded[f"{name}_cache_shard"] == (
      [1, 2, 9, 3, 8] if name == "sim"  # [L, B, S, K, H]
      else [2, 3, 9, 4])  # codes [B, K, S, H // 2]


def test_layer_collectives_are_two_all_reduces(sharded):
  # One after o_proj, one after down_proj; no weight is gathered.
  assert sharded["hlo_plain"] == ["all-reduce", "all-reduce"]
  assert sharded["hlo_block"] == ["all-reduce", "all-reduce"]
  # A full-width online Hadamard spans the shards and moves data.
  assert set(sharded["hlo_full"]) - {"all-reduce"}, sharded["hlo_full"]


def test_packed_kernels_run_per_shard(sharded):
  # Packed W4A4KV4 decode layer with the Pallas kernels in shard_map: the
  # psums of o_proj and down_proj, nothing else (no weight, no KV4 cache
  # moves).
  assert sharded["hlo_packed_layer"] == ["all-reduce", "all-reduce"]
  assert sharded["packed_forward_pallas"]
  for t in (6, 1):
    hlo = sharded[f"hlo_packed_forward_t{t}"]
    # No uint8 collective: no packed weight or KV4 code moves.
    assert not [c for c in hlo if c[0].startswith("u8")], hlo
    # Per layer (1 here) the two psums [B, T, D]; the vocabulary-sharded
    # embedding lookup adds one all-reduce [B, T, D] and the replicated
    # logits of the tied head one all-gather of the embedding [D, V].
    assert sorted(hlo) == sorted(
        [[f"f32[2,{t},64]", "all-reduce"]] * 3
        + [["f32[64,96]", "all-gather"]]), hlo


def test_generate_on_sharded_params(sharded):
  want, got = sharded["generate"]
  assert got == want and len(want[0]) == 3
  assert sharded["split_over_devices"] == [False, True]  # then not fused


def test_generate_with_mesh(sharded):
  want = sharded["generate"][0]
  assert sharded["generate_mesh"] == want
  packed_want, packed_got = sharded["generate_packed"]
  assert packed_got == packed_want and len(packed_want[0]) == 3
  assert sharded["placed_not_copied"]
  # The head-sharded KV cache [L, B, S = 11, K, H] never moves between
  # devices during prefill or decode (no collective has an 11 axis).
  shapes = sharded["generate_mesh_collective_shapes"]
  assert shapes and not any("11" in s.split(",") for s in shapes), shapes


def test_generate_with_mesh_names_the_size_that_does_not_divide(sharded):
  assert sharded["generate_mesh_error"] == (
      "cannot split the model over mesh {'tp': 3}: num_key_value_heads=4"
      " must be divisible by tp=3")


def test_packed_linear_per_shard(sharded):
  # Column parallel: each device the kernels on its 24 output columns.
  assert sharded["column_linear"] <= 1e-6
  assert sharded["column_linear_shard"] == [2, 3, 24]
  assert sharded["column_linear_hlo"] == []
  # Row parallel: the kernels on each half of `in`, one all-reduce.
  assert sharded["row_linear"] <= 1e-6
  assert sharded["row_vs_simulated"] <= 1e-5
  assert sharded["row_linear_shard"] == [2, 3, 48]
  assert sharded["row_linear_hlo"] == ["all-reduce"]
  assert sharded["column_linear_pallas"] and sharded["row_linear_pallas"]


def test_packed_linear_rejects_unknown_parallel():
  with pytest.raises(ValueError, match="parallel='diagonal' must be"):
    sharding.packed_linear(jnp.ones((2, 4)), {}, mesh=sharding.make_mesh(1),
                           parallel="diagonal", a_spec=None)


def test_init_params_sharded(sharded):
  assert sharded["init_equal"]
  assert sharded["init_q_shard"] == [1, 64, 48]  # [L, D, N·H / 2]


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  print(json.dumps(_sharded_checks()))
