"""Key centering: exactly invariant in float, and it rescues a KV4 cache
whose keys carry a large constant offset (Qwen2's k_proj bias)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import checkpoint
from quarot_jax import generation
from quarot_jax import hf
from quarot_jax import key_center
from quarot_jax import kv_cache
from quarot_jax import learned_rotation
from quarot_jax import model
from quarot_jax import quarot
from quarot_jax import run_layout
from tests import decode_steps
from tests import hf_models


@pytest.fixture(scope="module")
def biased():
  """A tiny Qwen2 whose k_proj bias is large in the slowest RoPE pairs, as
  in Qwen2.5's first layers: (params, config, tokens, float logits)."""
  params, config = hf.load_hf(hf_models.tiny_hf_model("qwen2")[0])
  params = jax.tree.map(np.array, params)
  attn = params["layers"]["self_attn"]
  # Sharp attention (scores that matter), then the offset: 320 in the two
  # slowest pairs of each kv head (RoPE turns them by ~3e-4 rad a token).
  attn["q_proj"]["kernel"] *= 8.0
  attn["k_proj"]["kernel"] *= 8.0
  h, half = config.head_dim, config.head_dim // 2
  slow = [d for head in range(config.num_key_value_heads)
          for d in (head * h + half - 1, head * h + h - 1)]
  attn["k_proj"]["bias"][:, slow] += 320.0
  tokens = hf_models.random_tokens(config.vocab_size, 2, 24, seed=7)
  logits = np.asarray(model.forward(params, tokens, config)[0])
  return params, config, tokens, logits


def _random_centers(config, seed=0):
  return 5.0 * jax.random.normal(
      jax.random.key(seed), (config.num_hidden_layers,
                             config.num_key_value_heads, config.head_dim))


def test_any_center_leaves_the_float_model_unchanged(biased):
  params, config, tokens, want = biased
  centered = key_center.fold(params, _random_centers(config))
  got = np.asarray(model.forward(centered, tokens, config)[0])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
  assert not np.allclose(np.asarray(centered["layers"]["self_attn"]
                                    ["k_center"]), 0)


def test_centered_cache_decodes_the_same_tokens(biased):
  params, config, tokens, _ = biased
  prompts = [list(map(int, row[:10])) for row in np.asarray(tokens)]
  want = generation.generate_tokens(params, config, prompts,
                                    max_new_tokens=6, eos_ids=[])
  centered = key_center.fold(params, _random_centers(config, seed=1))
  got = generation.generate_tokens(centered, config, prompts,
                                   max_new_tokens=6, eos_ids=[])
  assert got == want


def test_calibrate_gives_the_mean_cached_key_of_each_layer(biased):
  params, config, tokens, _ = biased
  calib = np.asarray(tokens)
  centers = np.asarray(key_center.calibrate(params, config, calib,
                                            batch_size=1))
  assert centers.shape == (config.num_hidden_layers,
                           config.num_key_value_heads, config.head_dim)
  # Layer 0 by hand: its input is the embedding, its keys k_proj of the norm.
  x = params["embed_tokens"]["embedding"][calib].astype(np.float32)
  lp = jax.tree.map(lambda a: a[0], params["layers"])
  _, _, _, taps = model.decoder_layer(jnp.asarray(x), lp, config=config)
  positions = jnp.broadcast_to(jnp.arange(calib.shape[1]), calib.shape)
  keys = model.cached_keys(taps["qkv"], lp["self_attn"], positions,
                           config=config, options=model.FLOAT)
  np.testing.assert_allclose(centers[0], np.asarray(keys.mean(axis=(0, 1))),
                             rtol=1e-5, atol=1e-4)
  # The slow pairs carry the +320 offset through RoPE (about unturned).
  half = config.head_dim // 2
  assert np.abs(centers[:, :, [half - 1, -1]]).min() > 200


def test_calibrate_refuses_centered_params_and_no_windows(biased):
  params, config, tokens, _ = biased
  with pytest.raises(ValueError, match="calibration windows"):
    key_center.calibrate(params, config, np.zeros((0, 8), np.int32))
  centered = key_center.fold(params, _random_centers(config))
  with pytest.raises(ValueError, match="already"):
    key_center.calibrate(centered, config, np.asarray(tokens))


def _kl(p_logits, q_logits):
  p = jax.nn.log_softmax(jnp.asarray(p_logits), -1)
  q = jax.nn.log_softmax(jnp.asarray(q_logits), -1)
  return float((jnp.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("rotate", [False, True])
def test_centering_cuts_the_kv4_error_of_offset_keys(biased, rotate):
  params, config, tokens, want = biased
  kv4 = quarot.QuaRotConfig(k_bits=4, v_bits=4, rotate=rotate)
  calib = np.asarray(tokens)
  errors = {}
  for center in (False, True):
    qparams, options = quarot.quantize(
        params, config, dataclasses.replace(kv4, center_keys=center), calib,
        progress=False)
    assert ("k_center" in qparams["layers"]["self_attn"]) == center
    got = np.asarray(model.forward(qparams, tokens, config,
                                   options=options)[0])
    errors[center] = _kl(want, got)
  assert errors[True] < 0.25 * errors[False], errors


def test_center_keys_needs_calibration_windows(biased):
  params, config, _, _ = biased
  with pytest.raises(ValueError, match="center_keys"):
    quarot.quantize(params, config,
                    quarot.QuaRotConfig(k_bits=4, v_bits=4, center_keys=True),
                    None, progress=False)


def test_learning_budget_counts_the_key_centering(biased, tmp_path,
                                                  monkeypatch, clock):
  """`quarot.learn_rotations(time_budget_s=...)` counts from the call, so
  a key centering longer than the budget pauses after the first step."""
  params, config, tokens, _ = biased
  calibrate = key_center.calibrate

  def slow_calibrate(*a, **k):
    clock(1000.0)  # a centering longer than the budget
    return calibrate(*a, **k)

  monkeypatch.setattr(key_center, "calibrate", slow_calibrate)
  qconfig = quarot.QuaRotConfig(
      w_bits=16, a_bits=4, k_bits=4, v_bits=4, rotate_mode="learned",
      rotation_objective="e2e", rotation_steps=3, rotation_batch_size=1,
      center_keys=True)
  with pytest.raises(learned_rotation.LearningPaused) as paused:
    quarot.learn_rotations(params, config, qconfig, np.asarray(tokens),
                           progress=False, resume=str(tmp_path / "s.npz"),
                           time_budget_s=500.0)
  assert paused.value.step == 1


def test_packed_centered_model_matches_its_simulated_twin(biased):
  params, config, tokens, _ = biased
  qconfig = quarot.QuaRotConfig(w_bits=4, a_bits=16, k_bits=4, v_bits=4,
                                center_keys=True)
  calib = np.asarray(tokens)
  sim, options = quarot.quantize(params, config, qconfig, calib,
                                 progress=False)
  real, _ = quarot.quantize(params, config, qconfig, calib, packed=True,
                            progress=False)
  np.testing.assert_array_equal(real["layers"]["self_attn"]["k_center"],
                                sim["layers"]["self_attn"]["k_center"])
  # The per-layer decode layout keeps the centers beside the fused qkv.
  run = run_layout.unstack_layers(real, fuse=True)
  assert all("k_center" in lp["self_attn"] and "qkv_proj" in lp["self_attn"]
             for lp in run["layers"])
  float_cache = kv_cache.cache_for(config, 2, 32)
  kv4_cache = kv_cache.cache_for(config, 2, 32, packed=True)
  want, float_cache = model.forward(sim, tokens, config, cache=float_cache,
                                    options=options)
  got, kv4_cache = model.forward(real, tokens, config, cache=kv4_cache,
                                 options=options)
  scale = float(jnp.abs(want).max())
  assert float(jnp.abs(got - want).max()) < 1e-4 * scale
  tok = jnp.argmax(want[:, -1], -1)[:, None]
  want, _ = model.forward(sim, tok, config, cache=float_cache,
                          options=options)
  got, _ = model.forward(real, tok, config, cache=kv4_cache, options=options)
  assert float(jnp.abs(got - want).max()) < 1e-4 * scale


def test_fused_decode_qkv_subtracts_the_centers(biased):
  """The run layout's fused q/k/v decode (`decode_qkv`, interpreted) of a
  centered packed model gives the logits and KV4 cache of the unfused
  decode, which subtracts the centers op by op."""
  params, config, tokens, _ = biased
  qconfig = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                                center_keys=True)
  real, options = quarot.quantize(params, config, qconfig, np.asarray(tokens),
                                  packed=True, progress=False)
  (got, got_cache), (want, want_cache) = decode_steps.fused_and_unfused_decode(
      real, config, options, tokens, slots=32)
  scale = float(jnp.abs(want).max())
  assert float(jnp.abs(got - want).max()) < 1e-4 * scale
  # The head Hadamard's f32 sums run in another order (the kernel's dot):
  # an error of ~2^-21 of the uncentered key (as without centers), which
  # the center then magnifies ~16x (offset 320, centered range ~20): seen
  # 2^-17.1.
  decode_steps.assert_same_caches(got_cache, want_cache, scale_rtol=2 ** -16)


def test_centers_are_labelled_and_recorded():
  config = quarot.QuaRotConfig(k_bits=4, v_bits=4, center_keys=True)
  assert config.describe().endswith(" kc")
  assert not quarot.QuaRotConfig(k_bits=4, v_bits=4).describe().endswith("kc")


def test_e2e_rotation_learning_sees_centered_keys(biased):
  """With center_keys the e2e objective quantizes centered keys (as the
  model it learns for), so its loss starts lower on offset keys; the two
  configs learn under different keys."""
  params, config, tokens, _ = biased
  calib = np.asarray(tokens)
  base = quarot.QuaRotConfig(k_bits=4, v_bits=4, rotate_mode="learned",
                             rotation_objective="e2e", rotation_steps=1)
  losses = {}
  for center in (False, True):
    qconfig = dataclasses.replace(base, center_keys=center)
    _, losses[center] = quarot.learn_rotations(params, config, qconfig,
                                               calib, progress=False,
                                               return_losses=True)
  assert losses[True][0] < losses[False][0] - 0.01, losses
  assert (quarot.rotation_key(base)
          != quarot.rotation_key(dataclasses.replace(base, center_keys=True)))


def test_centers_survive_a_quantized_checkpoint(biased, tmp_path):
  params, config, tokens, _ = biased
  qconfig = quarot.QuaRotConfig(w_bits=4, k_bits=4, v_bits=4,
                                center_keys=True)
  real, _ = quarot.quantize(params, config, qconfig, np.asarray(tokens),
                            packed=True, progress=False)
  out = str(tmp_path / "ckpt")
  checkpoint.save_quantized(real, out, config, qconfig)
  loaded, _, got_qconfig, _ = checkpoint.load_quantized(out)
  assert got_qconfig == qconfig
  np.testing.assert_array_equal(loaded["layers"]["self_attn"]["k_center"],
                                real["layers"]["self_attn"]["k_center"])
