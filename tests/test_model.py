"""Logit parity of the functional model against transformers (torch, CPU)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from quarot_jax import hadamard
from quarot_jax import hf
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import qlinear
from quarot_jax import quant
from quarot_jax import quarot
from quarot_jax import run_layout
from tests import hf_models


def _torch_logits(torch_model, tokens):
  with torch.no_grad():
    return torch_model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_prefill_matches_transformers(family):
  path, torch_model = hf_models.tiny_hf_model(family)
  params, config = hf.load_hf(path)
  tokens = hf_models.random_tokens(config.vocab_size, 2, 24)
  logits, _ = jax.jit(model.forward, static_argnums=2)(params, tokens, config)
  want = _torch_logits(torch_model, tokens)
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_decode_through_cache_matches_transformers(family):
  path, torch_model = hf_models.tiny_hf_model(family)
  params, config = hf.load_hf(path)
  tokens = hf_models.random_tokens(config.vocab_size, 2, 12, seed=1)
  want = _torch_logits(torch_model, tokens)
  step = jax.jit(model.forward, static_argnums=2)
  cache = kv_cache.cache_for(config, batch=2, max_len=16)
  # Prefill 5 tokens, then decode one at a time.
  logits, cache = step(params, tokens[:, :5], config, cache=cache)
  got = [np.asarray(logits)]
  for t in range(5, 12):
    logits, cache = step(params, tokens[:, t:t + 1], config, cache=cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-4,
                             rtol=0)
  assert int(cache.end) == 12


def test_left_padding_does_not_change_logits():
  path, torch_model = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  tokens = hf_models.random_tokens(config.vocab_size, 1, 6, seed=2)
  want = _torch_logits(torch_model, tokens)
  padded = np.concatenate([np.zeros((1, 3), np.int32), tokens], axis=1)
  cache = kv_cache.cache_for(config, batch=1, max_len=10,
                             start=jnp.array([3], jnp.int32))
  logits, _ = model.forward(params, padded, config, cache=cache)
  np.testing.assert_allclose(np.asarray(logits)[:, 3:], want, atol=1e-4,
                             rtol=0)


def test_init_params_shapes_match_loader_table():
  config = hf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8)
  params = model.init_params(config, jax.random.key(0))
  shapes = hf.expected_shapes(config)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    assert leaf.shape == shapes[names], names


def test_llama2_7b_shapes_under_eval_shape():
  config = hf.LlamaConfig(vocab_size=32000, hidden_size=4096,
                          intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32,
                          head_dim=128)
  params = jax.eval_shape(
      lambda k: model.init_params(config, k, dtype=jnp.bfloat16),
      jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  logits, _ = jax.eval_shape(
      lambda p, t: model.forward(p, t, config), params, tokens)
  assert logits.shape == (1, 16, 32000)


@pytest.mark.parametrize("packed_cache", [False, True])
def test_unstacked_layers_decode_like_the_stacked_scan(packed_cache):
  """The per-layer run layout (generate's decode) computes what the stacked
  `lax.scan` computes, prefill and decode, float and packed KV4 caches."""
  path, _ = hf_models.tiny_hf_model("llama3")
  params, config = hf.load_hf(path)
  options = model.FLOAT
  if packed_cache:
    qconfig = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)
    params, options = quarot.quantize(params, config, qconfig, packed=True,
                                      progress=False)
  tokens = hf_models.random_tokens(config.vocab_size, 2, 9, seed=4)
  start = jnp.array([0, 2], jnp.int32)
  got = {}
  for unstacked in (False, True):
    p = run_layout.unstack_layers(params) if unstacked else params
    cache = kv_cache.cache_for(config, batch=2, max_len=12, start=start,
                               packed=packed_cache, per_layer=unstacked)
    logits, cache = model.forward(p, tokens[:, :6], config, cache=cache,
                                  options=options)
    steps = [logits]
    for t in range(6, 9):
      logits, cache = model.forward(p, tokens[:, t:t + 1], config,
                                    cache=cache, options=options)
      steps.append(logits)
    got[unstacked] = np.asarray(jnp.concatenate(steps, axis=1))
    assert cache.per_layer == unstacked and cache.packed == packed_cache
  np.testing.assert_allclose(got[True], got[False], atol=1e-5, rtol=0)


def test_unstack_layers_shares_leaves_and_mismatched_cache_is_refused():
  config = hf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8)
  params = model.init_params(config, jax.random.key(0))
  per_layer = run_layout.unstack_layers(params)
  assert len(per_layer["layers"]) == 3
  assert run_layout.unstack_layers(per_layer) is per_layer
  np.testing.assert_array_equal(
      per_layer["layers"][2]["mlp"]["down_proj"]["kernel"],
      params["layers"]["mlp"]["down_proj"]["kernel"][2])
  assert per_layer["embed_tokens"] is params["embed_tokens"]
  stacked_cache = kv_cache.cache_for(config, batch=1, max_len=4)
  tokens = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="per_layer=True"):
    model.forward(per_layer, tokens, config, cache=stacked_cache)
  with pytest.raises(ValueError, match="per_layer=False"):
    model.forward(params, tokens, config, cache=kv_cache.cache_for(
        config, batch=1, max_len=4, per_layer=True))


# GQA (K < N), FFN and head widths that differ, D a multiple of 64 (the
# packed kernels' K).
_FUSE_CONFIG = hf.LlamaConfig(vocab_size=64, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16)


def _fuse_params(bias: bool, packed: bool, layers: int = 2):
  """Tiny params (`_FUSE_CONFIG`, q/k biases but no v bias when `bias`),
  float or packed int4 (RTN), their config and RunOptions."""
  config = dataclasses.replace(_FUSE_CONFIG, attention_bias=bias,
                               num_hidden_layers=layers)
  params = model.init_params(config, jax.random.key(0))
  if bias:  # a sibling without a bias: the fused one has zeros there
    attn = dict(params["layers"]["self_attn"])
    attn["v_proj"] = {"kernel": attn["v_proj"]["kernel"]}
    params["layers"] = {**params["layers"], "self_attn": attn}
  if not packed:
    return params, config, model.FLOAT
  spec = quant.QuantSpec(bits=4)
  qarrays = qlinear.quantize_weights_rtn(params, quarot.LINEARS, spec)
  return (qlinear.pack_params(params, qarrays), config,
          model.RunOptions(a_spec=spec))


@pytest.mark.parametrize("packed", [False, True])
def test_fuse_projections_concatenates_along_out(packed):
  params, _, _ = _fuse_params(bias=True, packed=packed)
  plain = run_layout.unstack_layers(params)
  fused = run_layout.unstack_layers(params, fuse=True)
  assert "qkv_proj" not in plain["layers"][0]["self_attn"]  # default kept
  for i, (p, f) in enumerate(zip(plain["layers"], fused["layers"])):
    attn, mlp = f["self_attn"], f["mlp"]
    assert set(attn) == {"qkv_proj", "o_proj"}
    assert set(mlp) == {"gate_up_proj", "down_proj"}
    for (block, name), names in run_layout.FUSED_PROJECTIONS.items():
      fused_p, parts = f[block][name], [p[block][n] for n in names]
      if packed:  # qweight [out, in // 2], wscale [out]
        np.testing.assert_array_equal(fused_p["qweight"], np.concatenate(
            [q["qweight"] for q in parts], axis=0))
        np.testing.assert_array_equal(fused_p["wscale"], np.concatenate(
            [q["wscale"] for q in parts]))
      else:  # kernel [in, out]
        np.testing.assert_array_equal(fused_p["kernel"], np.concatenate(
            [q["kernel"] for q in parts], axis=1))
    # q [N*H = 64] and k [K*H = 32] biases, then 32 zeros for v.
    bias = np.asarray(attn["qkv_proj"]["bias"])
    want = params["layers"]["self_attn"]
    np.testing.assert_array_equal(bias[:64], want["q_proj"]["bias"][i])
    np.testing.assert_array_equal(bias[64:96], want["k_proj"]["bias"][i])
    np.testing.assert_array_equal(bias[96:], np.zeros(32))
    assert "bias" not in mlp["gate_up_proj"]
  # Fusing again changes nothing, and returns the same objects.
  assert run_layout.fuse_projections(fused["layers"][0]) is fused["layers"][0]
  assert run_layout.unstack_layers(fused, fuse=True) is fused
  if packed:  # a float up_proj beside a packed gate_proj: left unfused
    layer = plain["layers"][0]
    mixed = {**layer, "mlp": {**layer["mlp"], "up_proj": {
        "kernel": jnp.zeros((64, 128))}}}
    got = run_layout.fuse_projections(mixed)
    assert got["mlp"] is mixed["mlp"] and "qkv_proj" in got["self_attn"]


@pytest.mark.parametrize("kernels, bias", [
    ("float", False), ("float", True), ("interpret", False),
    # ~20 s: XLA on a CPU compiles the reference int4 unpack slowly.
    pytest.param("xla", True, marks=pytest.mark.slow)])
def test_fused_projections_compute_the_unfused_logits(kernels, bias):
  """Prefill (18 rows: the prefill matmuls) and one decode step (2 rows:
  `decode_matmul` when packed) through per-layer params, fused or not."""
  packed = kernels != "float"
  params, config, options = _fuse_params(bias=bias, packed=packed, layers=1)
  tokens = hf_models.random_tokens(config.vocab_size, 2, 10, seed=5)
  step = functools.partial(model.forward, config=config, options=options,
                           kernels="xla" if kernels == "float" else kernels)

  @jax.jit  # one compile per layout (the XLA int4 unpack compiles slowly)
  def prefill_and_decode(p):
    cache = kv_cache.cache_for(config, batch=2, max_len=12, per_layer=True)
    prefill, cache = step(p, tokens[:, :9], cache=cache)
    decode, _ = step(p, tokens[:, 9:], cache=cache)
    return jnp.concatenate([prefill, decode], axis=1)

  got = {fuse: np.asarray(prefill_and_decode(
      run_layout.unstack_layers(params, fuse=fuse))) for fuse in (False, True)}
  assert np.abs(got[False]).max() > 0.1  # logits that can differ
  np.testing.assert_allclose(got[True], got[False], atol=1e-6, rtol=0)


def test_fused_decode_step_runs_four_matmuls_a_layer():
  params, config, _ = _fuse_params(bias=True, packed=False)
  tokens = jnp.zeros((1, 1), jnp.int32)
  dots = {}
  for fuse in (False, True):
    p = run_layout.unstack_layers(params, fuse=fuse)
    cache = kv_cache.cache_for(config, batch=1, max_len=4, per_layer=True)
    jaxpr = jax.make_jaxpr(lambda p, c: model.forward(
        p, tokens, config, cache=c, kernels="xla"))(p, cache)
    dots[fuse] = str(jaxpr).count("dot_general")
  # 7 -> 4 linears in each of the 2 layers.
  assert dots[False] - dots[True] == 3 * config.num_hidden_layers


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-6),
                                         (jnp.bfloat16, 1e-2)])
def test_head_hadamard_is_the_fast_transform(dtype, rtol):
  # The Q/K rotation as one dense matmul is the butterfly's map (up to
  # rounding) and keeps norms: q·k is unchanged when both are rotated.
  kq, kk = jax.random.split(jax.random.key(7))
  q = (3.0 * jax.random.normal(kq, (2, 3, 4, 64))).astype(dtype)
  k = (3.0 * jax.random.normal(kk, (2, 3, 4, 64))).astype(dtype)
  got = model._head_hadamard(q)
  assert got.dtype == dtype and got.shape == q.shape
  want = hadamard.fast_hadamard_transform(q)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=rtol,
                             atol=rtol)
  f32 = lambda x: np.asarray(x, np.float64)
  dots = (f32(q) * f32(k)).sum(-1)
  rotated = (f32(model._head_hadamard(q)) * f32(model._head_hadamard(k))
             ).sum(-1)
  np.testing.assert_allclose(rotated, dots, rtol=rtol * 10,
                             atol=rtol * 10 * np.abs(dots).max())


# GPTQ builds each linear's Hessian from its tap, so a tap must be the input
# the linear multiplies: after the online Hadamard when the linear is float
# (a regression had handed back o_proj's input before it, and GPTQ W4A4KV4
# on SmolLM2 lost 39.11 -> 41.30 ppl on the H200).
@pytest.mark.parametrize("had_blocks", [1, 2])
def test_taps_are_what_each_linear_multiplies(had_blocks):
  config = hf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8)
  params = model.init_params(config, jax.random.key(0), scale=0.2)
  lp = jax.tree.map(lambda a: a[0], params["layers"])
  options = model.RunOptions(online_had_down=True, online_had_o=True,
                             qk_had=True, had_blocks=had_blocks)
  x = jax.random.normal(jax.random.key(1), (2, 6, 32), jnp.float32)
  zero = lambda p, name: {**p, name: {
      "kernel": jnp.zeros_like(p[name]["kernel"])}}

  def layer(lp):
    return model.decoder_layer(x, lp, config=config, options=options)

  # Without the MLP's output the layer adds o_proj(tap) to x; without the
  # attention's, down_proj(tap).
  out, _, _, taps = layer({**lp, "mlp": zero(lp["mlp"], "down_proj")})
  o_kernel = lp["self_attn"]["o_proj"]["kernel"]
  np.testing.assert_allclose(np.asarray(out - x),
                             np.asarray(taps["o"] @ o_kernel),
                             atol=1e-5, rtol=1e-5)
  out, _, _, taps = layer({**lp, "self_attn": zero(lp["self_attn"],
                                                    "o_proj")})
  np.testing.assert_allclose(
      np.asarray(out - x),
      np.asarray(taps["down"] @ lp["mlp"]["down_proj"]["kernel"]),
      atol=1e-5, rtol=1e-5)
