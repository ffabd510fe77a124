"""Real W4A4KV4 end to end on tiny models: packed params and the KV4 cache
give what simulated quantization gives; checkpoints keep their qconfig."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hadamard_quant as hq_lib
from pallas_kernels import prefill_qkv as prefill_qkv_lib
from pallas_kernels.w4a4_matmul import api as w4a4_api
from quarot_jax import checkpoint
from quarot_jax import generation
from quarot_jax import hf
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import quarot
from quarot_jax import run_layout
from quarot_jax.config import LlamaConfig
from tests import decode_steps
from tests import hf_models

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W4A4KV4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def tiny(request):
  """(float params, config, tokens) of a tiny GQA (llama3) or biased (qwen2)
  HF model."""
  params, config = hf.load_hf(hf_models.tiny_hf_model(request.param)[0])
  tokens = hf_models.random_tokens(config.vocab_size, 2, 12, seed=3)
  return params, config, tokens


def _both(params, config, qconfig=W4A4KV4, calib=None):
  sim = quarot.quantize(params, config, qconfig, calib, progress=False)
  real = quarot.quantize(params, config, qconfig, calib, packed=True,
                         progress=False)
  return sim, real


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_packed_forward_equals_simulated(tiny):
  params, config, tokens = tiny
  (sim, options), (real, real_options) = _both(params, config)
  assert real_options == options
  assert "qweight" in real["layers"]["self_attn"]["o_proj"]
  want, _ = model.forward(sim, tokens, config, options=options)
  got, _ = model.forward(real, tokens, config, options=options)
  # Identical integer codes and scales; only f32 summation order differs.
  assert _rel(got, want) < 1e-4


def test_packed_learned_scales_equal_simulated(tiny):
  """Learned rotations with channel scales (a norm weight 1 / s in front of
  the packed linears): the packed forward gives the simulated one."""
  params, config, tokens = tiny
  qconfig = dataclasses.replace(
      W4A4KV4, rotate_mode="learned", rotation_objective="e2e",
      rotation_steps=2, rotation_lr=0.05, learn_scales=True)
  rotations = quarot.learn_rotations(params, config, qconfig, tokens,
                                     progress=False)
  assert float(jnp.abs(rotations.scales - 1).max()) > 1e-3
  sim, options = quarot.quantize(params, config, qconfig, tokens,
                                 rotations=rotations, progress=False)
  real, _ = quarot.quantize(params, config, qconfig, tokens, packed=True,
                            rotations=rotations, progress=False)
  assert "qweight" in real["layers"]["mlp"]["up_proj"]
  want, _ = model.forward(sim, tokens, config, options=options)
  got, _ = model.forward(real, tokens, config, options=options)
  assert _rel(got, want) < 1e-4


# The 128G mode: weight scales per group of `in` (32 here: the tiny widths
# 64 and 96 have no group of 128).
W4A4KV4_G32 = dataclasses.replace(W4A4KV4, w_groupsize=32)
# The paper's weight-only setting: asymmetric per-column 4-bit weights.
W4A16_ASYM = quarot.QuaRotConfig(w_bits=4, w_asym=True)


@pytest.mark.parametrize("a_bits", [4, 16])
def test_packed_group_scales_equal_simulated(tiny, a_bits):
  params, config, tokens = tiny
  qconfig = dataclasses.replace(W4A4KV4_G32, a_bits=a_bits)
  (sim, options), (real, _) = _both(params, config, qconfig)
  down = real["layers"]["mlp"]["down_proj"]
  # [L, out, in / 32]: one scale per group, not per channel.
  assert down["wscale"].shape == (config.num_hidden_layers,
                                  config.hidden_size,
                                  config.intermediate_size // 32)
  want, _ = model.forward(sim, tokens, config, options=options)
  got, _ = model.forward(real, tokens, config, options=options)
  assert _rel(got, want) < 1e-4
  # Not vacuous: the per-channel model gives other logits.
  per_channel, _ = quarot.quantize(params, config,
                                   dataclasses.replace(qconfig,
                                                       w_groupsize=None),
                                   progress=False)
  other, _ = model.forward(per_channel, tokens, config, options=options)
  assert _rel(other, want) > 1e-3


def test_packed_group_scales_prefill_and_decode_in_interpret_mode():
  # Prefill and decode (no decode_matmul: it takes per-channel scales) run
  # the grouped Triton kernel and give the XLA references' logits, in the
  # fused per-layer run layout too.
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  tokens = hf_models.random_tokens(config.vocab_size, 1, 5, seed=4)
  real, options = quarot.quantize(params, config, W4A4KV4_G32, packed=True,
                                  progress=False)
  out = {}
  for setting in ("xla", "interpret"):
    for layout in ("stacked", "fused"):
      p = real if layout == "stacked" else run_layout.unstack_layers(
          real, fuse=True)
      cache = kv_cache.cache_for(config, 1, 8, packed=True,
                                 per_layer=layout == "fused")
      prefill, cache = model.forward(p, tokens[:, :3], config, cache=cache,
                                     options=options, kernels=setting)
      decode, _ = model.forward(p, tokens[:, 3:], config, cache=cache,
                                options=options, kernels=setting)
      out[setting, layout] = (prefill, decode)
  cache = kv_cache.cache_for(config, 1, 8, packed=True)
  want = out["xla", "stacked"]
  for key, (prefill, decode) in out.items():
    assert _rel(prefill, want[0]) < 1e-4, key
    assert _rel(decode, want[1]) < 1e-4, key
  jaxpr = str(jax.make_jaxpr(lambda p: model.forward(
      p, tokens[:, 3:], config, cache=cache, options=options,
      kernels="interpret")[0])(real))
  assert "w4a4_matmul_triton" in jaxpr and "decode_matmul" not in jaxpr


def _max_kl(p_logits, q_logits):
  p = jax.nn.log_softmax(p_logits, -1)
  q = jax.nn.log_softmax(q_logits, -1)
  return float((jnp.exp(p) * (p - q)).sum(-1).max())


@pytest.mark.parametrize("a_bits", [16, 4])
def test_kv4_cache_prefill_and_decode_match_the_float_cache(tiny, a_bits):
  params, config, tokens = tiny
  qconfig = dataclasses.replace(W4A4KV4, a_bits=a_bits)
  (sim, options), (real, _) = _both(params, config, qconfig)
  start = jnp.array([0, 3], jnp.int32)  # row 1 is left-padded by 3 slots
  float_cache = kv_cache.cache_for(config, 2, 16, start=start)
  kv4_cache = kv_cache.cache_for(config, 2, 16, start=start, packed=True)
  assert kv4_cache.packed and kv4_cache.max_len == 16

  def check(got, want):
    if a_bits == 16:
      # The packed cache holds the simulated path's codes, scales and zeros
      # exactly; only f32 summation order differs.
      assert _rel(got, want) < 1e-4
    else:
      # With 4-bit activations an f32 summation-order difference can flip
      # the rounding of an activation code near a tie (one whole step of
      # 1/7 of a token's range), so compare next-token distributions.
      assert _max_kl(want, got) < 1e-3

  want, float_cache = model.forward(sim, tokens, config, cache=float_cache,
                                    options=options)
  got, kv4_cache = model.forward(real, tokens, config, cache=kv4_cache,
                                 options=options)
  check(got, want)
  for _ in range(3):
    tok = jnp.argmax(want[:, -1], -1)[:, None]
    want, float_cache = model.forward(sim, tok, config, cache=float_cache,
                                      options=options)
    got, kv4_cache = model.forward(real, tok, config, cache=kv4_cache,
                                   options=options)
    check(got, want)
  assert int(kv4_cache.end) == 15


def test_packed_forward_runs_every_kernel_in_interpret_mode():
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  tokens = hf_models.random_tokens(config.vocab_size, 1, 4, seed=1)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  for setting in ("xla", "interpret"):
    cache = kv_cache.cache_for(config, 1, 8, packed=True)
    prefill, cache = model.forward(real, tokens[:, :3], config, cache=cache,
                                   options=options, kernels=setting)
    decode, _ = model.forward(real, tokens[:, 3:], config, cache=cache,
                              options=options, kernels=setting)
    if setting == "xla":
      want = (prefill, decode)
  jaxpr = str(jax.make_jaxpr(lambda p: model.forward(
      p, tokens[:, 3:], config, cache=cache, options=options,
      kernels="interpret")[0])(real))
  # rms_norm_quant: the decode step's q/k/v and gate/up pre-norms are fused
  # into their quantizer, and give the unfused 'xla' logits.
  for name in ("hadamard_quant", "w4a4_matmul_triton",
               "kv4_decode_attention", "rms_norm_quant"):
    assert name in jaxpr, name
  assert _rel(prefill, want[0]) < 1e-4
  assert _rel(decode, want[1]) < 1e-4


def _forward_on_and_off(monkeypatch, params, tokens, config, options, *,
                        field, spied, arg, per_layer=False):
  """model.forward of a 20-slot packed cache with the interpreted kernels'
  `field` on and off, recording `arg` of each call of `spied` (a (module,
  function name) pair): {on: ((logits, cache), [arg is set, per call])}."""
  module, name = spied
  handed, real = [], getattr(module, name)
  def spy(*args, **kw):
    value = kw.get(arg)  # an array (residual) or a flag (gate_up)
    handed.append(value is not None and value is not False)
    return real(*args, **kw)
  monkeypatch.setattr(module, name, spy)
  runs = {}
  for on in (True, False):
    handed.clear()
    kern = dataclasses.replace(kernels_lib.resolve("interpret"),
                               **{field: on})
    cache = kv_cache.cache_for(config, 1, 20, packed=True,
                               per_layer=per_layer)
    out = model.forward(params, tokens, config, cache=cache, options=options,
                        kernels=kern)
    runs[on] = (out, list(handed))
  return runs


def test_prefill_hands_o_and_down_proj_the_residual_stream(monkeypatch):
  # At prefill each layer's two residual adds go to o_proj's and
  # down_proj's W4A4 matmul (the Mosaic kernel adds them in its epilogue);
  # `residual_in_matmul=False` adds them in XLA: the same logits.
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  tokens = hf_models.random_tokens(config.vocab_size, 1, 20, seed=2)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  runs = _forward_on_and_off(
      monkeypatch, real, tokens, config, options, field="residual_in_matmul",
      spied=(w4a4_api, "w4a4_matmul"), arg="residual")
  for fused, (_, handed) in runs.items():
    # Each traced layer (once under the layer scan): q, k, v, o, gate, up,
    # down; only o and down take the residual.
    one_layer = [False] * 3 + [fused] + [False] * 2 + [fused]
    assert handed and handed == one_layer * (len(handed) // 7), handed
  np.testing.assert_array_equal(np.asarray(runs[True][0][0]),
                                np.asarray(runs[False][0][0]))


def test_prefill_down_proj_quantizer_forms_the_swiglu(monkeypatch):
  # Run layout (fused gate_up_proj): each layer's down_proj quantizer gets
  # gate | up and forms the SwiGLU itself; `swiglu_in_quant=False` runs
  # the SwiGLU in XLA first: the same logits and caches.
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  tokens = hf_models.random_tokens(config.vocab_size, 1, 20, seed=7)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  runs = _forward_on_and_off(
      monkeypatch, run_layout.unstack_layers(real, fuse=True), tokens,
      config, options, field="swiglu_in_quant",
      spied=(hq_lib, "hadamard_quant"), arg="gate_up", per_layer=True)
  for in_quant, (_, handed) in runs.items():
    # Per layer (unrolled): o's quantizer, then down's.
    assert handed == [False, in_quant] * config.num_hidden_layers, handed
  (got, got_cache), (want, want_cache) = runs[True][0], runs[False][0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  decode_steps.assert_same_caches(got_cache, want_cache, scale_rtol=0)


def test_fused_decode_qkv_equals_the_unfused_decode(tiny):
  """Run layout (fused qkv_proj) with interpreted kernels: the decode step
  goes through `decode_qkv` and gives the logits and KV4 cache of the
  op-by-op decode (apply_rope, head Hadamard, kv4_append)."""
  params, config, tokens = tiny
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  (got, got_cache), (want, want_cache) = decode_steps.fused_and_unfused_decode(
      real, config, options, tokens, slots=16)
  assert _rel(got, want) < 1e-4
  # These tiny models are f32: an f32 scale may differ in its last bits.
  decode_steps.assert_same_caches(got_cache, want_cache, scale_rtol=2 ** -21)


def test_fused_prefill_through_prefill_qkv_equals_the_unfused_ops(tiny):
  """Run layout (fused qkv_proj) with interpreted kernels: a 16-token
  prefill goes through `prefill_qkv` and gives the logits and KV4 cache
  of the op-by-op prefill (apply_rope, head Hadamard, key center,
  write_kv4)."""
  params, config, _ = tiny
  tokens = hf_models.random_tokens(config.vocab_size, 2, 16, seed=4)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  fused = run_layout.unstack_layers(real, fuse=True)
  unfused = run_layout.unstack_layers(real)
  cache = kv_cache.cache_for(config, 2, 24, packed=True, per_layer=True)
  step = lambda p, k: model.forward(p, tokens, config, cache=cache,
                                    options=options, kernels=k)
  assert "prefill_qkv" in str(jax.make_jaxpr(
      lambda p: step(p, "interpret")[0])(fused))
  assert "prefill_qkv" not in str(jax.make_jaxpr(
      lambda p: step(p, "interpret")[0])(unfused))
  got, got_cache = step(fused, "interpret")
  want, want_cache = step(unfused, "xla")
  assert _rel(got, want) < 1e-4
  # These tiny models are f32: an f32 scale may differ in its last bits.
  decode_steps.assert_same_caches(got_cache, want_cache, scale_rtol=2 ** -21)


def test_prefill_qkv_block_tokens_reach_the_kernel(tiny, monkeypatch):
  """Kernels.prefill_qkv_block_tokens sets the tokens a `prefill_qkv`
  program takes (the largest power of two <= it dividing T) and
  Kernels.prefill_qkv_half_rope its rope_halves_equal (on by default);
  each prefill is the default's bit for bit."""
  params, config, _ = tiny
  tokens = hf_models.random_tokens(config.vocab_size, 2, 48, seed=6)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  fused = run_layout.unstack_layers(real, fuse=True)
  cache = kv_cache.cache_for(config, 2, 48, packed=True, per_layer=True)
  seen, kernel = [], prefill_qkv_lib.prefill_qkv

  def spy(*args, **kwargs):
    seen.append((kwargs["block_tokens"], kwargs["rope_halves_equal"]))
    return kernel(*args, **kwargs)

  monkeypatch.setattr(prefill_qkv_lib, "prefill_qkv", spy)
  interpret = kernels_lib.resolve("interpret")
  step = lambda k: model.forward(fused, tokens, config, cache=cache,
                                 options=options, kernels=k)
  want, want_cache = step(interpret)
  assert set(seen) == {(None, True)}
  seen.clear()
  # 48 tokens: at most 32 gives 16 (the largest power of two dividing 48).
  got, got_cache = step(dataclasses.replace(interpret,
                                            prefill_qkv_block_tokens=32))
  assert seen and set(seen) == {(16, True)}
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The default reads only the first halves of the model's cos and sin
  # (rope_cos_sin's, the frequencies twice): the full read, the same bits.
  seen.clear()
  got, got_cache = step(dataclasses.replace(interpret,
                                            prefill_qkv_half_rope=False))
  assert seen and set(seen) == {(None, False)}
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("bad", [8, 48, 0, 16.0])
def test_prefill_qkv_block_tokens_must_be_a_power_of_two(bad):
  with pytest.raises(ValueError, match="prefill_qkv_block_tokens"):
    kernels_lib.Kernels(prefill_qkv_block_tokens=bad)


@pytest.mark.gpu
def test_packed_forward_on_gpu_uses_mosaic_matmul_and_matches_reference():
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  tokens = hf_models.random_tokens(config.vocab_size, 2, 12, seed=5)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  fwd = jax.jit(lambda p, k: model.forward(p, tokens, config,
                                           options=options, kernels=k)[0],
                static_argnames="k")
  assert "w4a4_matmul_mosaic_wt" in fwd.lower(real, "mosaic").as_text()
  assert _rel(fwd(real, "mosaic"), fwd(real, "xla")) < 1e-4


@pytest.mark.gpu
def test_packed_group_scales_of_128_run_mosaic_on_gpu():
  # Widths with groups of 128: the Mosaic grouped kernel, at prefill and at
  # decode (no decode_matmul with group scales), gives the XLA logits.
  config = LlamaConfig(vocab_size=128, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64)
  params = model.init_params(config, jax.random.key(0))
  qconfig = dataclasses.replace(W4A4KV4, w_groupsize=128)
  real, options = quarot.quantize(params, config, qconfig, packed=True,
                                  progress=False)
  for t in (40, 3):  # prefill, then a decode-sized step
    tokens = hf_models.random_tokens(config.vocab_size, 2, t, seed=t)
    fwd = jax.jit(lambda p, k, tokens=tokens: model.forward(
        p, tokens, config, options=options, kernels=k)[0],
                  static_argnames="k")
    assert "w4a4_matmul_mosaic_wt_grouped" in fwd.lower(
        real, "mosaic").as_text()
    assert _rel(fwd(real, "mosaic"), fwd(real, "xla")) < 1e-4


@pytest.mark.gpu
def test_gpu_prefill_qkv_gives_the_unfused_prefill():
  """kernels.prefill_qkv='pallas' on the GPU (off in 'auto' until timed):
  the same logits and caches as the XLA ops it replaces, up to the order
  of the head Hadamard's f32 sums."""
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  tokens = hf_models.random_tokens(config.vocab_size, 2, 32, seed=6)
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  fused = run_layout.unstack_layers(real, fuse=True)
  auto = kernels_lib.resolve("auto")
  on = dataclasses.replace(auto, prefill_qkv="pallas")
  cache = kv_cache.cache_for(config, 2, 40, packed=True, per_layer=True)
  fwd = jax.jit(lambda p, k: model.forward(p, tokens, config, cache=cache,
                                           options=options, kernels=k),
                static_argnames="k")
  assert "prefill_qkv" in fwd.lower(fused, on).as_text()
  (got, got_cache), (want, want_cache) = fwd(fused, on), fwd(fused, auto)
  assert _rel(got, want) < 1e-3
  # This tiny model is f32: the head Hadamard's sums in another order move
  # the rotated keys by an ulp or so, hence the f32 scales, and now and
  # then a code at a rounding tie.
  for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    g, w = np.asarray(g), np.asarray(w)
    if g.dtype == np.float32:
      np.testing.assert_allclose(g, w, rtol=2 ** -18, atol=0)
    else:
      assert np.mean(g != w) < 1e-3


def test_generate_on_packed_params_agrees_with_simulated():
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  (sim, options), (real, _) = _both(params, config)
  prompts = [[5, 9, 2, 7], [3, 8]]
  want = generation.generate_tokens(sim, config, prompts, max_new_tokens=16,
                                    options=options)
  got = generation.generate_tokens(real, config, prompts, max_new_tokens=16,
                                   options=options)
  same = np.mean(np.asarray(want) == np.asarray(got))
  assert same >= 0.99, (want, got)
  assert model.uses_kv4_cache(real, options)
  assert not model.uses_kv4_cache(sim, options)


@pytest.mark.parametrize("w_asym", [False, True])
def test_gptq_packed_weights_are_the_simulated_gptq_weights(w_asym):
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama2")[0])
  calib = hf_models.random_tokens(config.vocab_size, 4, 16, seed=7)
  qconfig = dataclasses.replace(W4A4KV4, w_method="gptq", w_asym=w_asym,
                                a_bits=16 if w_asym else 4)
  (sim, options), (real, _) = _both(params, config, qconfig, calib)
  tokens = hf_models.random_tokens(config.vocab_size, 2, 8, seed=2)
  want, _ = model.forward(sim, tokens, config, options=options)
  got, _ = model.forward(real, tokens, config, options=options)
  assert _rel(got, want) < 1e-4


def test_unpackable_configs_name_every_problem():
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama2")[0])
  bad = quarot.QuaRotConfig(w_bits=8, a_bits=8, k_bits=4, v_bits=3,
                            w_groupsize=15)
  with pytest.raises(NotImplementedError,
                     match=r"w_bits=8 .*w_groupsize=15 .*a_bits=8 .*v_bits=3"):
    quarot.quantize(params, config, bad, packed=True, progress=False)


def test_quantized_checkpoint_round_trip_and_mismatch(tmp_path):
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  real, options = quarot.quantize(params, config, W4A4KV4, packed=True,
                                  progress=False)
  path = checkpoint.save_quantized(real, str(tmp_path / "q"), config,
                                   W4A4KV4)
  restored, restored_config, qconfig, restored_options = (
      checkpoint.load_quantized(path, expected=W4A4KV4,
                                expected_config=config))
  assert (qconfig, restored_options, restored_config) == (
      W4A4KV4, options, config)
  assert restored["layers"]["mlp"]["down_proj"]["qweight"].dtype == np.uint8
  tokens = hf_models.random_tokens(config.vocab_size, 1, 6)
  np.testing.assert_array_equal(
      np.asarray(model.forward(restored, tokens, config, options=options)[0]),
      np.asarray(model.forward(real, tokens, config, options=options)[0]))
  other = dataclasses.replace(W4A4KV4, a_bits=16, kv_clip=0.9)
  with pytest.raises(ValueError, match=r"a_bits: checkpoint 4, expected 16;"
                     r" kv_clip: checkpoint 0.95, expected 0.9"):
    checkpoint.load_quantized(path, expected=other)
  with pytest.raises(ValueError, match="num_hidden_layers: checkpoint"):
    checkpoint.load_quantized(path, expected_config=dataclasses.replace(
        config, num_hidden_layers=config.num_hidden_layers + 1))
  float_path = checkpoint.save_params(params, str(tmp_path / "f"), config)
  with pytest.raises(ValueError, match="holds a float model"):
    checkpoint.load_quantized(float_path)


@pytest.mark.parametrize("leaf, ndim", [("wscale", 3), ("wzero", 2)])
def test_group_scaled_and_asymmetric_checkpoint_round_trip(tmp_path, leaf,
                                                           ndim):
  # Group scales [L, out, G]; asymmetric weights' zero points [L, out]:
  # both stay f32 in the checkpoint (other floats take its dtype).
  qconfig = W4A4KV4_G32 if leaf == "wscale" else W4A16_ASYM
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama2")[0])
  real, options = quarot.quantize(params, config, qconfig, packed=True,
                                  progress=False)
  path = checkpoint.save_quantized(real, str(tmp_path / "g"), config,
                                   qconfig)
  restored, _, got_qconfig, _ = checkpoint.load_quantized(path)
  assert got_qconfig == qconfig
  kept = restored["layers"]["self_attn"]["q_proj"][leaf]
  assert kept.dtype == np.float32 and kept.ndim == ndim
  tokens = hf_models.random_tokens(config.vocab_size, 1, 6)
  np.testing.assert_array_equal(
      np.asarray(model.forward(restored, tokens, config, options=options)[0]),
      np.asarray(model.forward(real, tokens, config, options=options)[0]))


def test_convert_cli_writes_a_packed_checkpoint(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  out = tmp_path / "w4"
  proc = subprocess.run(
      [sys.executable, "-m", "convert.hf_to_orbax", f"--hf_dir={path}",
       f"--out_dir={out}", "--quantize", "--w_method=rtn",
       "--dtype=bfloat16"],
      cwd=_ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  params, _, qconfig, _ = checkpoint.load_quantized(str(out))
  assert qconfig == W4A4KV4
  layers = params["layers"]
  assert layers["mlp"]["up_proj"]["qweight"].dtype == np.uint8
  assert layers["mlp"]["up_proj"]["wscale"].dtype == np.float32
  assert layers["input_layernorm"].get("scale") is None or (
      layers["input_layernorm"]["scale"].dtype == jnp.bfloat16)
  proc = subprocess.run(
      [sys.executable, "-m", "convert.hf_to_orbax", f"--hf_dir={path}",
       f"--out_dir={tmp_path / 'w8'}", "--quantize", "--w_bits=8"],
      cwd=_ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert "w_bits=8 (needs 4)" in proc.stderr
  assert not (tmp_path / "w8").exists()



@pytest.mark.parametrize("w_groupsize", [None, 32])
def test_packed_asymmetric_w4a16_equals_simulated(tiny, w_groupsize):
  params, config, tokens = tiny
  qconfig = dataclasses.replace(W4A16_ASYM, w_groupsize=w_groupsize)
  (sim, options), (real, _) = _both(params, config, qconfig)
  down = real["layers"]["mlp"]["down_proj"]
  assert down["wzero"].shape == down["wscale"].shape
  assert float(jnp.abs(down["wzero"]).max()) > 0  # not all zero points 8
  want, _ = model.forward(sim, tokens, config, options=options)
  got, _ = model.forward(real, tokens, config, options=options)
  assert _rel(got, want) < 1e-4
  # The generate layout (fused q/k/v and gate/up) and the interpreted
  # kernels give the same.
  fused = run_layout.unstack_layers(real, fuse=True)
  assert "wzero" in fused["layers"][0]["self_attn"]["qkv_proj"]
  got_fused, _ = model.forward(fused, tokens, config, options=options,
                               kernels="interpret")
  assert _rel(got_fused, want) < 1e-4
  # Not vacuous: symmetric weights give other logits.
  sym, _ = quarot.quantize(params, config,
                           dataclasses.replace(qconfig, w_asym=False),
                           progress=False)
  other, _ = model.forward(sym, tokens, config, options=options)
  assert _rel(other, want) > 1e-3


def test_asymmetric_weights_pack_only_with_float_activations():
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama2")[0])
  with pytest.raises(NotImplementedError,
                     match="w_asym=True .needs symmetric weights with 4-bit"
                     " activations"):
    quarot.quantize(params, config, dataclasses.replace(W4A4KV4, w_asym=True),
                    packed=True, progress=False)
