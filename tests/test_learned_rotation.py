"""Learned rotations: folding is invariant, training lowers its loss."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import hadamard
from quarot_jax import hf
from quarot_jax import learned_rotation
from quarot_jax import learned_rotation_core as core
from quarot_jax import model
from quarot_jax import quant
from quarot_jax import rotation

# 3 query heads over 1 KV head (an odd head count, like SmolLM2's 9 / 3).
_CONFIG = hf.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def tiny():
  params = model.init_params(_CONFIG, jax.random.key(0), scale=0.2)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, 61),
                      np.int32)
  return params, tokens


def _logits(params, tokens, options=model.FLOAT):
  return np.asarray(model.forward(params, tokens, _CONFIG,
                                  options=options)[0])


def _random_rotations(key):
  k1, k2 = jax.random.split(key)
  return core.Rotations(
      r1=hadamard.random_orthogonal_matrix(_CONFIG.hidden_size, k1),
      r2=jax.vmap(lambda k: hadamard.random_orthogonal_matrix(8, k))(
          jax.random.split(k2, _CONFIG.num_hidden_layers)))


def test_fold_of_any_rotation_is_invariant(tiny):
  params, tokens = tiny
  want = _logits(params, tokens)
  folded = learned_rotation.fold(params, _CONFIG,
                                 _random_rotations(jax.random.key(2)))
  got = _logits(folded, tokens[:2], rotation.ROTATED)
  rel = np.abs(got - want[:2]).max() / np.abs(want).max()
  assert rel <= 1e-4, rel
  assert np.abs(folded["layers"]["self_attn"]["v_proj"]["kernel"]
                - params["layers"]["self_attn"]["v_proj"]["kernel"]
                ).max() > 1e-3


def test_fold_of_the_start_is_quarots_rotation(tiny):
  params, _ = tiny
  key = jax.random.key(5)
  got = learned_rotation.fold(
      params, _CONFIG, learned_rotation.initial_rotations(_CONFIG, key))
  want = rotation.rotate(params, _CONFIG, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               got, want)


@pytest.mark.parametrize("objective", ["whip", "qerror"])
def test_calibration_lowers_its_loss_and_folds_invariantly(tiny, objective):
  params, tokens = tiny
  options = dataclasses.replace(
      rotation.ROTATED, a_spec=quant.QuantSpec(bits=4, clip_ratio=0.9),
      v_spec=quant.QuantSpec(bits=4, symmetric=False, group_size=8))
  rot, losses = learned_rotation.learn(
      params, _CONFIG, tokens, objective=objective, steps=8, lr=0.1,
      key=jax.random.key(0), options=options, progress=False)
  assert losses.shape == (8,) and losses[-1] < losses[0]
  r0 = learned_rotation.initial_rotations(_CONFIG, jax.random.key(0))
  assert np.abs(rot.r1 - r0.r1).max() > 1e-3
  assert np.abs(rot.r2 - r0.r2).max() > 1e-3
  assert float(core.orthogonality_error(rot.r1)) < 1e-5
  assert float(core.orthogonality_error(rot.r2)) < 1e-5
  want = _logits(params, tokens[:2])
  got = _logits(learned_rotation.fold(params, _CONFIG, rot), tokens[:2],
                rotation.ROTATED)
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def _outlier_problem():
  """One layer with an outlier channel (5) in its residual stream, 4-bit
  activations, on windows the float model predicts well (greedy
  continuations): (params, config, tokens, options)."""
  config = dataclasses.replace(_CONFIG, num_hidden_layers=1)
  params = model.init_params(config, jax.random.key(0), scale=0.5)
  emb = params["embed_tokens"]["embedding"]
  params["embed_tokens"]["embedding"] = emb.at[:, 5].multiply(10.0)
  tokens = np.array(jax.random.randint(jax.random.key(1), (4, 32), 0, 61),
                    np.int32)
  logits = jax.jit(lambda t: model.forward(params, t, config)[0])
  for t in range(8, 31):
    tokens[:, t + 1] = np.argmax(logits(tokens)[:, t], axis=-1)
  options = dataclasses.replace(
      rotation.ROTATED, a_spec=quant.QuantSpec(bits=4, clip_ratio=0.9))
  return params, config, tokens, options


def test_e2e_training_lowers_the_quantized_loss():
  # `_outlier_problem`, learned from the identity: the quantized
  # next-token loss has much to gain, and the straight-through gradient
  # must find it.
  params, config, tokens, options = _outlier_problem()
  eye = core.Rotations(r1=jnp.eye(24), r2=jnp.eye(8)[None])
  rot, losses = learned_rotation.learn(
      params, config, tokens, objective="e2e", steps=10, lr=0.1,
      key=jax.random.key(0), options=options, batch_size=4, start=eye,
      progress=False)
  assert losses[-3:].mean() < losses[0] - 0.2, losses
  assert float(core.orthogonality_error(rot.r1)) < 1e-5
  assert float(core.orthogonality_error(rot.r2)) < 1e-5


def test_fold_with_scales_is_invariant_and_ones_change_nothing(tiny):
  params, tokens = tiny
  want = _logits(params, tokens)
  rot = _random_rotations(jax.random.key(2))
  n, d = _CONFIG.num_hidden_layers, _CONFIG.hidden_size
  s = jnp.exp(jax.random.normal(jax.random.key(3), (n, 2, d)))
  scaled = learned_rotation.fold(params, _CONFIG,
                                 dataclasses.replace(rot, scales=s))
  got = _logits(scaled, tokens[:2], rotation.ROTATED)
  assert np.abs(got - want[:2]).max() / np.abs(want).max() <= 1e-4
  # Scales of one are the rotation alone, bit for bit.
  plain = _logits(learned_rotation.fold(params, _CONFIG, rot), tokens[:2],
                  rotation.ROTATED)
  ones = learned_rotation.fold(params, _CONFIG, dataclasses.replace(
      rot, scales=jnp.ones((n, 2, d))))
  np.testing.assert_array_equal(
      _logits(ones, tokens[:2], rotation.ROTATED), plain)


def test_e2e_scales_shrink_the_outlier_channel():
  """`_outlier_problem` (channel 5 of the residual ten times larger),
  from the identity: the learned scale
  of channel 5 at the attention input grows the most (the norm output is
  divided by it, so its quantization range shrinks), and the loss falls."""
  params, config, tokens, options = _outlier_problem()
  eye = core.Rotations(r1=jnp.eye(24), r2=jnp.eye(8)[None],
                       scales=jnp.ones((1, 2, 24)))
  rot, losses = learned_rotation.learn(
      params, config, tokens, objective="e2e", steps=10, lr=0.05,
      key=jax.random.key(0), options=options, batch_size=4, start=eye,
      progress=False)
  assert losses[-3:].mean() < losses[0] - 0.2, losses
  attn_in = np.asarray(rot.scales[0, 0])
  assert int(np.argmax(attn_in)) == 5, attn_in
  assert attn_in[5] > 1.1 and bool(np.all(attn_in > 0)), attn_in
  assert float(core.orthogonality_error(rot.r1)) < 1e-5


def test_e2e_kl_loss_starts_at_the_float_models_distribution_and_falls():
  """loss='kl': the first step's loss is KL(float ‖ quantized start),
  computed here independently, and learning lowers it."""
  params, config, tokens, options = _outlier_problem()
  eye = core.Rotations(r1=jnp.eye(24), r2=jnp.eye(8)[None])
  rot, losses = learned_rotation.learn(
      params, config, tokens, objective="e2e", steps=10, lr=0.1,
      key=jax.random.key(0), options=options, batch_size=4, start=eye,
      progress=False, loss="kl")
  teacher = model.forward(params, tokens, config)[0]
  student = model.forward(learned_rotation.fold(params, config, eye), tokens,
                          config, options=options)[0]
  # batch_size = all 4 windows: the first step sees all of them.
  np.testing.assert_allclose(losses[0], core.kl_loss(student, teacher),
                             rtol=2e-3)
  assert losses[0] > 0.05, losses
  assert losses[-3:].mean() < 0.7 * losses[0], losses
  assert float(core.orthogonality_error(rot.r1)) < 1e-5


def test_scale_lr_sets_the_scales_own_rate():
  """scale_lr = lr is the one-rate run bit for bit; a vanishing scale_lr
  leaves the scales at 1 while the rotations still learn."""
  params, config, tokens, options = _outlier_problem()
  eye = core.Rotations(r1=jnp.eye(24), r2=jnp.eye(8)[None],
                       scales=jnp.ones((1, 2, 24)))
  kw = dict(objective="e2e", steps=4, lr=0.05, key=jax.random.key(0),
            options=options, batch_size=4, start=eye, progress=False)
  one, one_losses = learned_rotation.learn(params, config, tokens, **kw)
  same, same_losses = learned_rotation.learn(params, config, tokens,
                                             scale_lr=0.05, **kw)
  np.testing.assert_array_equal(same_losses, one_losses)
  np.testing.assert_array_equal(same.scales, one.scales)
  np.testing.assert_array_equal(same.r1, one.r1)
  slow, _ = learned_rotation.learn(params, config, tokens, scale_lr=1e-9,
                                   **kw)
  np.testing.assert_allclose(slow.scales, 1.0, atol=1e-7)
  assert np.abs(np.asarray(one.scales) - 1).max() > 1e-3
  assert np.abs(np.asarray(slow.r1) - np.eye(24)).max() > 1e-3


def test_scales_need_the_e2e_objective(tiny):
  params, tokens = tiny
  with pytest.raises(ValueError, match="learned scales need"
                     " objective='e2e', got objective='whip'"):
    learned_rotation.learn(params, _CONFIG, tokens, objective="whip",
                           steps=1, key=jax.random.key(0), scales=True)


def test_zero_steps_return_the_start(tiny):
  params, tokens = tiny
  rot, losses = learned_rotation.learn(params, _CONFIG, tokens,
                                       objective="e2e", steps=0,
                                       key=jax.random.key(3))
  r0 = learned_rotation.initial_rotations(_CONFIG, jax.random.key(3))
  np.testing.assert_array_equal(rot.r1, r0.r1)
  assert losses.shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(objective="spin", steps=1), "objective='spin'"),
    (dict(objective="whip", steps=-1), "steps=-1"),
    (dict(objective="whip", steps=1, time_budget_s=10.0),
     "time_budget_s=10.0 needs a resume file"),
    (dict(objective="whip", steps=1, resume="x.npz", time_budget_s=-1.0),
     "time_budget_s=-1.0 must be >= 0"),
    (dict(objective="e2e", steps=1, loss="mse"), "loss='mse' must be one of"),
    (dict(objective="whip", steps=1, loss="kl"),
     "loss='kl' needs objective='e2e', got objective='whip'"),
    (dict(objective="e2e", steps=1, scale_lr=1e-3),
     "scale_lr=0.001 needs learned scales"),
    (dict(objective="e2e", steps=1, scales=True, scale_lr=0.0),
     "scale_lr=0.0 must be a positive number"),
])
def test_learn_rejects_bad_arguments(tiny, kwargs, match):
  params, tokens = tiny
  with pytest.raises(ValueError, match=match):
    learned_rotation.learn(params, _CONFIG, tokens, key=jax.random.key(0),
                           **kwargs)


def test_learn_needs_calibration_windows(tiny):
  params, _ = tiny
  with pytest.raises(ValueError, match=r"\(0, 16\)"):
    learned_rotation.learn(params, _CONFIG, np.zeros((0, 16), np.int32),
                           objective="whip", steps=1, key=jax.random.key(0))


@pytest.mark.parametrize("objective", ["whip", "e2e"])
def test_paused_learning_resumes_to_the_same_rotations(tiny, objective,
                                                       tmp_path):
  """A time budget stops learning after a step and saves its state; the
  same call again resumes it, ending where one uninterrupted run ends."""
  params, tokens = tiny
  kw = dict(objective=objective, steps=3, lr=1e-2, key=jax.random.key(4),
            batch_size=2, progress=False)
  want, want_losses = learned_rotation.learn(params, _CONFIG, tokens, **kw)
  state = str(tmp_path / "state.npz")
  runs = 0
  while True:
    runs += 1
    try:
      got, losses = learned_rotation.learn(params, _CONFIG, tokens, **kw,
                                           resume=state, time_budget_s=0.0)
      break
    except learned_rotation.LearningPaused as e:
      assert (e.path, e.step, e.steps) == (state, runs, 3)
      assert os.path.exists(state)
  assert runs == 3  # a step a run: the budget is spent by the first
  assert not os.path.exists(state)  # done: nothing left behind
  np.testing.assert_array_equal(np.asarray(got.r1), np.asarray(want.r1))
  np.testing.assert_array_equal(np.asarray(got.r2), np.asarray(want.r2))
  np.testing.assert_array_equal(losses, want_losses)
  assert np.abs(np.asarray(got.r1) - np.asarray(
      learned_rotation.initial_rotations(_CONFIG, jax.random.key(4)).r1)
                ).max() > 1e-4  # it learned something


def test_time_budget_counts_the_setup_before_the_first_step(
    tiny, tmp_path, monkeypatch, clock):
  """A budget spent while preparing (key centering, `prepare`) pauses after
  the first step: on the H200, Qwen's preparation overran the budget and
  the run was killed by the call's wall-clock limit instead of pausing."""
  params, tokens = tiny
  prepare = learned_rotation.prepare

  def slow_prepare(*a, **k):
    clock(1000.0)  # a preparation longer than the budget
    return prepare(*a, **k)

  monkeypatch.setattr(learned_rotation, "prepare", slow_prepare)
  state = str(tmp_path / "state.npz")
  with pytest.raises(learned_rotation.LearningPaused) as paused:
    learned_rotation.learn(params, _CONFIG, tokens, objective="whip",
                           steps=3, lr=1e-2, key=jax.random.key(4),
                           progress=False, resume=state,
                           time_budget_s=500.0)
  assert paused.value.step == 1


def test_resume_refuses_the_state_of_another_run(tiny, tmp_path):
  params, tokens = tiny
  kw = dict(objective="whip", lr=1e-2, key=jax.random.key(4), progress=False)
  state = str(tmp_path / "state.npz")
  with pytest.raises(learned_rotation.LearningPaused):
    learned_rotation.learn(params, _CONFIG, tokens, steps=3, **kw,
                           resume=state, time_budget_s=0.0)
  with pytest.raises(ValueError, match="state.npz.*steps"):
    learned_rotation.learn(params, _CONFIG, tokens, steps=4, **kw,
                           resume=state)


def _grad_of_loss(config, params, tokens, remat):
  """d(next-token loss)/d(params) through `model.forward`, jitted."""
  def loss(p):
    logits, _ = model.forward(p, tokens, config, kernels="xla", remat=remat)
    return core.next_token_loss(logits, tokens)
  return jax.jit(jax.grad(loss))


def test_remat_forward_has_the_same_gradient_in_less_memory():
  """`remat` recomputes each layer in the backward pass: the same gradient,
  and the compiled step keeps fewer bytes alive (the reason it exists: the
  e2e step on Qwen2.5-1.5B at four windows asked for 186 GiB without it)."""
  config = dataclasses.replace(_CONFIG, num_hidden_layers=6)
  params = model.init_params(config, jax.random.key(2), scale=0.2)
  tokens = jnp.asarray(jax.random.randint(jax.random.key(3), (4, 64), 0, 61),
                       jnp.int32)
  plain = _grad_of_loss(config, params, tokens, remat=False)
  remat = _grad_of_loss(config, params, tokens, remat=True)
  # f32 summation order differs between the two programs: each leaf to
  # 1e-4 of its largest entry (a wrong gradient is off by O(1) of it).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0, atol=1e-4 * float(np.abs(a).max())),
               plain(params), remat(params))

  def temp_bytes(fn):
    return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(remat) < 0.7 * temp_bytes(plain), (
      temp_bytes(remat), temp_bytes(plain))


def test_e2e_learning_with_remat_learns_the_same_rotations(tiny):
  params, tokens = tiny
  options = dataclasses.replace(
      rotation.ROTATED, a_spec=quant.QuantSpec(bits=4, clip_ratio=0.9))
  kw = dict(objective="e2e", steps=3, lr=0.05, key=jax.random.key(0),
            options=options, batch_size=2, progress=False)
  want, want_losses = learned_rotation.learn(params, _CONFIG, tokens, **kw)
  got, got_losses = learned_rotation.learn(params, _CONFIG, tokens,
                                           remat=True, **kw)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  np.testing.assert_allclose(got.r1, want.r1, atol=1e-5)
  np.testing.assert_allclose(got.r2, want.r2, atol=1e-5)


@pytest.mark.parametrize("remat, batch_size, hint", [
    (False, 4, r"rotation_remat=True \(--rotation_remat\)"),
    (True, 2, r"smaller rotation_batch_size \(now 2\)"),
    (True, 1, r"device with more memory"),
])
def test_e2e_out_of_memory_is_one_line_that_says_what_to_lower(
    tiny, monkeypatch, remat, batch_size, hint):
  """The e2e step's OOM (Qwen2.5-1.5B: 'Out of memory while trying to
  allocate 186.02GiB', a page of allocator state) becomes one error naming
  the step's size and the knob to turn."""
  params, tokens = tiny
  def oom(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 186.02GiB"
        " with allocator GPU_0_bfc")
  monkeypatch.setattr(learned_rotation, "_train", oom)
  with pytest.raises(learned_rotation.OutOfDeviceMemory,
                     match=rf"{batch_size} windows of 16 tokens.*{hint}"):
    learned_rotation.learn(params, _CONFIG, tokens, objective="e2e", steps=2,
                           key=jax.random.key(0), batch_size=batch_size,
                           remat=remat, progress=False)


def test_e2e_other_runtime_errors_pass_through(tiny, monkeypatch):
  params, tokens = tiny
  def fail(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")
  monkeypatch.setattr(learned_rotation, "_train", fail)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    learned_rotation.learn(params, _CONFIG, tokens, objective="e2e", steps=2,
                           key=jax.random.key(0), progress=False)
