"""Learned rotations: collect activations, train, fold (the glue).

`learn` returns the residual rotation R1 [D, D] and the per-layer value/output
rotation R2 [L, H, H], starting from QuaRot's randomized Hadamard R1 and the
H_H of `rotation.rotate_values_and_o`, and optimizing them on calibration
windows (optax, a jitted step, a tqdm bar with the loss). `fold` puts them
into the params with the same pure transforms that fold the Hadamards
(`rotation.fuse_norms`, `rotate_residual`, `rotate_down_input`,
`rotate_values_and_o(r2=...)`); the online Hadamards (down_proj input, o_proj
input, Q/K after RoPE) stay, so the result runs with `rotation.ROTATED`
options exactly as `rotation.rotate`'s does. Objectives (the math is in
`learned_rotation_core`):

* 'whip' (DartQuant): R1 on the inputs of q/k/v and gate/up of every layer,
  each R2 on its layer's value heads, cached once from the float model;
  each rotation minimizes the Whip loss of its rotated inputs (QR
  parameterization, Adam). Cheap: no model runs while training.
* 'qerror': the same, minimizing instead the quantization error of the
  rotated inputs under the activation (R1) and value-cache (R2) quantizers
  of the forward, clip ratios included.
* 'e2e' (SpinQuant): both rotations minimize the next-token loss of the
  quantized network (activations, KV cache and, when asked, RTN weights
  fake-quantized with a straight-through estimator; `quant.fake_quant`),
  through the whole model (Cayley parameterization, Adam). With
  `scales=True` it also learns a positive scale per channel of each
  layer's two norm -> linear paths (OSTQuant's learnable scaling; log-scales
  under the same Adam, at their own peak rate with `scale_lr`), folded
  after R1 by `rotation.scale_norm_outputs`. `loss='kl'` minimizes instead
  the KL divergence from the float network's next-token distributions
  (OSTQuant's choice: every position's whole distribution, not one sampled
  token), at the cost of one more (gradient-free) forward a step.

Training runs at TF32 matmul precision (`jax.default_matmul_precision`);
folding runs at the caller's precision.

Long learning can run in parts (a device call is bounded): with `resume`
(a file) and `time_budget_s`, `learn` saves its state (parameters, Adam's
moments, losses, step) there and raises `LearningPaused` once the budget is
spent; the same call again resumes from the file, takes the same batches
and ends with the rotations and losses of one uninterrupted run; the file
is removed when learning ends.
"""

import functools
import hashlib
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from quarot_jax import hadamard
from quarot_jax import learned_rotation_core as core
from quarot_jax import model
from quarot_jax import quant
from quarot_jax import rotation
from quarot_jax.config import LlamaConfig
from quarot_jax.learned_rotation_core import Rotations

Params = dict[str, Any]

OBJECTIVES = ("whip", "qerror", "e2e")
LOSSES = ("ce", "kl")  # the 'e2e' loss: next-token cross-entropy, or KL
DEFAULT_LR = 1e-3
_TRAIN_PRECISION = "tensorfloat32"
# The base params (norms fused, H_Fᵀ folded) run with the down Hadamard only.
_BASE = model.RunOptions(online_had_down=True)
_LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"),
            ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def initial_rotations(config: LlamaConfig, key: jax.Array, *,
                      scales: bool = False) -> Rotations:
  """QuaRot's rotations: randomized Hadamard R1 and H_H in every layer.

  Args:
    config: the model config.
    key: seeds R1 (the same key gives `rotation.rotate`'s Q).
    scales: also learn channel scales (`Rotations.scales`), starting at 1.

  Returns:
    `Rotations`; folding them equals `rotation.rotate(params, config, key)`.
  """
  h, d, n = config.head_dim, config.hidden_size, config.num_hidden_layers
  r2 = hadamard.fast_hadamard_transform(jnp.eye(h, dtype=jnp.float32))
  return Rotations(
      r1=hadamard.random_hadamard_matrix(d, key),
      r2=jnp.broadcast_to(r2, (n, h, h)),
      scales=jnp.ones((n, 2, d), jnp.float32) if scales else None)


@jax.jit
def prepare(params: Params) -> Params:
  """f32 params with norms fused and H_Fᵀ folded into down_proj.

  The part of the fold that does not depend on the learned rotations; run
  them with `online_had_down=True`.
  """
  return rotation.rotate_down_input(rotation.fuse_norms(params, None))


def fold_into(base: Params, config: LlamaConfig,
              rotations: Rotations) -> Params:
  """Folds R2 (and H_(N·H)), then R1, then any scales into params from
  `prepare`.

  Differentiable in `rotations`. The result runs with `rotation.ROTATED`.
  """
  p = rotation.rotate_values_and_o(base, config, r2=rotations.r2)
  p = rotation.rotate_residual(p, rotations.r1)
  if rotations.scales is not None:
    p = rotation.scale_norm_outputs(p, rotations.scales)
  return p


@functools.partial(jax.jit, static_argnames="config")
def fold(params: Params, config: LlamaConfig,
         rotations: Rotations) -> Params:
  """The full rotation with R1, R2 given (learned or not).

  Args:
    params: float params.
    config: the model config.
    rotations: orthogonal R1 f32[D, D] and R2 f32[L, H, H], and any
      channel scales f32[L, 2, D].

  Returns:
    f32 params to run with `rotation.ROTATED` options (plus quantization);
    with `initial_rotations(config, key)` this is `rotation.rotate`.
  """
  return fold_into(prepare(params), config, rotations)


@functools.partial(jax.jit, static_argnames="config")
def _sampled_inputs(base, tokens, idx, config):
  """R1 and R2 inputs at token positions idx int32[B, n] of every layer.

  Returns:
    (x f32[L, 2, B, n, D]: the normed inputs of q/k/v and of gate/up;
     v f32[L, B, n, K, H]: the value heads).
  """
  take = lambda a: jnp.take_along_axis(a, idx[..., None], axis=1)
  kv, h = config.num_key_value_heads, config.head_dim

  def body(x, lp):
    out, _, _, taps = model.decoder_layer(x, lp, config=config,
                                          options=_BASE)
    vp = lp["self_attn"]["v_proj"]
    v = jnp.einsum("BTD,DO->BTO", taps["qkv"], vp["kernel"])
    if "bias" in vp:
      v = v + vp["bias"]
    b, t, _ = v.shape
    v = take(v.reshape(b, t, kv * h)).reshape(b, -1, kv, h)  # [B, n, K, H]
    return out, (jnp.stack([take(taps["qkv"]), take(taps["gate_up"])]), v)

  x = base["embed_tokens"]["embedding"][tokens]
  return jax.lax.scan(body, x, base["layers"])[1]


def collect_inputs(base: Params, config: LlamaConfig, calib_tokens: np.ndarray,
                   *, tokens_per_window: int, key: jax.Array,
                   batch_size: int = 4) -> tuple[jax.Array, jax.Array]:
  """Caches the float model's inputs of R1 and R2 (the Whip objective).

  Args:
    base: params from `prepare`.
    config: the model config.
    calib_tokens: int32[n, T] calibration windows.
    tokens_per_window: positions sampled (without replacement) per window.
    key: draws the positions.
    batch_size: windows per forward.

  Returns:
    (x1 f32[M, D]: every layer's q/k/v and gate/up inputs, unit rms;
     v f32[L, M', K, H]: every layer's value heads, each scaled to unit
     rms), where M = 2 L n k and M' = n k for k = tokens_per_window.
  """
  n, t = calib_tokens.shape
  k = min(tokens_per_window, t)
  keys = jax.random.split(key, n)
  idx = jax.vmap(lambda kk: jax.random.permutation(kk, t)[:k])(keys)
  xs, vs = [], []
  for i in range(0, n, batch_size):
    x, v = _sampled_inputs(base, jnp.asarray(calib_tokens[i:i + batch_size]),
                           idx[i:i + batch_size].astype(jnp.int32), config)
    xs.append(x)
    vs.append(v)
  x1 = jnp.concatenate(xs, axis=2).reshape(-1, config.hidden_size)
  # [L, M', K, H]
  v = jnp.concatenate(vs, axis=1).reshape(
      config.num_hidden_layers, -1, config.num_key_value_heads,
      config.head_dim)
  return core.rms_normalize(x1), core.rms_normalize(v)


class LearningPaused(Exception):
  """Learning stopped at its time budget; its state is saved in `path`.

  Attributes:
    path: the state file that the same call resumes from.
    step: steps done.
    steps: steps asked for.
  """

  def __init__(self, path: str, step: int, steps: int):
    super().__init__(f"rotation learning paused at step {step} of {steps};"
                     f" its state is in {path}: run the same command again"
                     " to resume")
    self.path, self.step, self.steps = path, step, steps


class OutOfDeviceMemory(MemoryError):
  """An 'e2e' step did not fit in device memory; the message names its size
  (windows x tokens, remat) and what to lower."""


def _out_of_memory(error: jax.errors.JaxRuntimeError, windows: int,
                   tokens: int, remat: bool) -> OutOfDeviceMemory | None:
  """The `OutOfDeviceMemory` for an XLA allocation failure, else None."""
  if "RESOURCE_EXHAUSTED" not in str(error):
    return None
  if not remat:
    hint = "rotation_remat=True (--rotation_remat)"
  elif windows > 1:
    hint = f"a smaller rotation_batch_size (now {windows})"
  else:
    hint = "a device with more memory"
  first = str(error).splitlines()[0]
  return OutOfDeviceMemory(
      f"the e2e learning step ran out of device memory at {windows} windows"
      f" of {tokens} tokens a step (remat={remat}): try {hint}. XLA: {first}")


def _fingerprint(r0: Rotations) -> str:
  """sha256 of the start's bytes (a state resumes only its own start)."""
  digest = hashlib.sha256()
  for a in jax.tree.leaves(r0):
    digest.update(np.asarray(a, np.float32).tobytes())
  return digest.hexdigest()


def _save_state(path: str, meta: dict[str, Any], theta, opt_state,
                losses: list[float], step: int, seconds: float) -> None:
  """Writes the learning state to `path` atomically (temp file, rename;
  a failed write leaves nothing), making its directory if needed."""
  leaves = jax.tree.leaves((theta, opt_state))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  try:
    np.savez(tmp, **{f"leaf{i}": np.asarray(a)
                     for i, a in enumerate(leaves)},
             losses=np.asarray(losses, np.float32), step=np.int64(step),
             seconds=np.float64(seconds),
             meta=np.asarray(repr(sorted(meta.items()))))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_state(path: str, meta: dict[str, Any], theta, opt_state):
  """(theta, opt_state, losses, step, seconds) saved in `path` by a run
  with the same `meta` and state shapes."""
  with np.load(path) as f:
    saved = {k: f[k] for k in f.files}
  if str(saved["meta"]) != repr(sorted(meta.items())):
    raise ValueError(f"{path!r} holds the learning state of another run"
                     f" ({saved['meta']}), not of {sorted(meta.items())};"
                     " delete it to start again")
  leaves, treedef = jax.tree.flatten((theta, opt_state))
  got = [saved[f"leaf{i}"] for i in range(len(leaves))]
  if [(g.shape, g.dtype) for g in got] != [
      (np.shape(a), np.asarray(a).dtype) for a in leaves]:
    raise ValueError(f"{path!r} holds learning state of other shapes")
  theta, opt_state = jax.tree.unflatten(treedef,
                                        [jnp.asarray(g) for g in got])
  return (theta, opt_state, [float(x) for x in saved["losses"]],
          int(saved["step"]), float(saved["seconds"]))


def resumed_seconds(path: str | None) -> float:
  """Learning seconds of the runs before a saved state (0: none saved)."""
  if path is None or not os.path.exists(path):
    return 0.0
  with np.load(path) as f:
    return float(f["seconds"])


def _adam(lr: float, steps: int) -> optax.GradientTransformation:
  return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))


def _optimizer(lr: float, steps: int, scale_lr: float | None
               ) -> optax.GradientTransformation:
  """Adam with cosine decay; the log-scales at peak `scale_lr` when it is
  given and differs from `lr` (one Adam over everything otherwise, so the
  one-rate run and its saved states stay as they were)."""
  if scale_lr is None or scale_lr == lr:
    return _adam(lr, steps)
  return optax.multi_transform(
      {"rotations": _adam(lr, steps), "scales": _adam(scale_lr, steps)},
      lambda theta: {k: "scales" if k == "log_scales" else "rotations"
                     for k in theta})


def _train(loss_fn, r0: Rotations, batches, *, parameterization: str,
           lr: float, steps: int, progress: bool, desc: str,
           resume: str | None = None, deadline: float | None = None,
           save_every_s: float = 60.0, scale_lr: float | None = None
           ) -> tuple[Rotations, np.ndarray]:
  """Adam on the parameters of R = R0 @ P(W), one jitted step per batch.

  Args:
    loss_fn: (rotations, batch) -> f32 scalar.
    r0: the start.
    batches: step -> the batch for that step (a pytree of arrays).
    parameterization: 'qr' or 'cayley'.
    lr: peak learning rate (cosine decay to 0).
    steps: optimizer steps.
    progress: show a tqdm bar with the loss.
    desc: the bar's label.
    resume: a state file: resumed from when it exists, written every
      `save_every_s` and when the budget is spent, removed at the end.
    deadline: with `resume`, stop after the first step that ends at or
      past this `time.time()` (the last step never stops).
    save_every_s: seconds between state saves.
    scale_lr: peak learning rate of the log-scales (None: `lr`).

  Returns:
    (rotations, f32[steps] loss before each step).

  Raises:
    LearningPaused: the budget was spent (the state is in `resume`).
    ValueError: `resume` holds another run's state.
  """
  optimizer = _optimizer(lr, steps, scale_lr)

  @jax.jit
  def step(theta, opt_state, batch):
    def loss(th):
      return loss_fn(core.rotations(th, r0, parameterization), batch)
    value, grads = jax.value_and_grad(loss)(theta)
    updates, opt_state = optimizer.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, value

  theta = core.zero_theta(r0)
  opt_state = optimizer.init(theta)
  losses, first, before = [], 0, 0.0
  meta = dict(desc=desc, steps=steps, lr=float(lr),
              parameterization=parameterization, start=_fingerprint(r0))
  if scale_lr is not None and scale_lr != lr:  # old states stay resumable
    meta["scale_lr"] = float(scale_lr)
  if resume is not None and os.path.exists(resume):
    theta, opt_state, losses, first, before = _load_state(
        resume, meta, theta, opt_state)
    if progress:
      tqdm.tqdm.write(f"{desc}: resuming at step {first} of {steps} from"
                      f" {resume}")
  start = saved = time.time()
  bar = tqdm.trange(first, steps, desc=desc, disable=not progress,
                    leave=False, initial=first, total=steps)
  with jax.default_matmul_precision(_TRAIN_PRECISION):
    for i in bar:
      theta, opt_state, value = step(theta, opt_state, batches(i))
      losses.append(float(value))
      bar.set_postfix(loss=f"{losses[-1]:.4f}")
      now, done = time.time(), i + 1
      if resume is None or done == steps:
        continue
      spent = deadline is not None and now >= deadline
      if spent or now - saved >= save_every_s:
        _save_state(resume, meta, theta, opt_state, losses, done,
                    before + now - start)
        saved = now
      if spent:
        bar.close()
        raise LearningPaused(resume, done, steps)
  if resume is not None and os.path.exists(resume):
    os.remove(resume)
  if progress and losses:
    # One batch's loss is noisy (each step sees other windows): compare the
    # means of the first and last tenth of the steps.
    k = max(1, len(losses) // 10)
    tqdm.tqdm.write(f"{desc}: {steps} steps in {time.time() - start:.1f} s"
                    f" (first with compilation), mean loss of the first"
                    f" {k} steps {np.mean(losses[:k]):.4f} -> last {k}"
                    f" {np.mean(losses[-k:]):.4f}")
  return (core.rotations(theta, r0, parameterization),
          np.asarray(losses, np.float32))


def learn_calibration(base: Params, config: LlamaConfig,
                      calib_tokens: np.ndarray, r0: Rotations, *,
                      objective: str, options: model.RunOptions, steps: int,
                      lr: float, key: jax.Array, tokens_per_window: int = 64,
                      progress: bool = True, resume: str | None = None,
                      deadline: float | None = None
                      ) -> tuple[Rotations, np.ndarray]:
  """DartQuant-style calibration of R1 and every R2 on cached inputs.

  The loss is f(x1 @ R1) + mean over layers of f(v_l @ R2_l), f the Whip
  loss ('whip') or the quantization error under `options.a_spec` and
  `options.v_spec` ('qerror'); the terms share no parameter, so this trains
  each rotation on its own inputs, all in one jitted step.

  Args:
    base: params from `prepare`.
    config: the model config.
    calib_tokens: int32[n, T] calibration windows.
    r0: the start.
    objective: 'whip' or 'qerror'.
    options: the quantizers ('qerror').
    steps: optimizer steps (full batch).
    lr: Adam's peak learning rate.
    key: samples the cached token positions.
    tokens_per_window: cached positions per window.
    progress: show progress bars.
    resume: the state file of a run in parts (module docstring), or None.
    deadline: with `resume`, pause after the step that ends past this
      `time.time()`.

  Returns:
    (rotations, f32[steps] losses).
  """
  x1, v = collect_inputs(base, config, calib_tokens,
                         tokens_per_window=tokens_per_window, key=key)
  if objective == "whip":
    f1 = f2 = core.whip_loss
  else:
    f1 = lambda x: core.quant_error_loss(x, options.a_spec)
    f2 = lambda x: core.quant_error_loss(x, options.v_spec)

  def loss_fn(rot, batch):
    x1, v = batch
    r2_loss = jax.vmap(lambda vl, r: f2(vl @ r))(v, rot.r2)
    return f1(x1 @ rot.r1) + jnp.mean(r2_loss)

  return _train(loss_fn, r0, lambda i: (x1, v), parameterization="qr",
                lr=lr, steps=steps, progress=progress,
                desc=f"learn R ({objective})", resume=resume,
                deadline=deadline)


def _rtn_ste(params: Params, spec: quant.QuantSpec) -> Params:
  """Every decoder linear's kernel fake-quantized per output channel (STE)."""
  p = jax.tree.map(lambda a: a, params)
  for block, name in _LINEARS:
    node = p["layers"][block][name]
    w = jnp.swapaxes(node["kernel"], -1, -2)  # [L, out, in]
    node["kernel"] = jnp.swapaxes(quant.fake_quant(w, spec), -1, -2)
  return p


def learn_e2e(base: Params, config: LlamaConfig, calib_tokens: np.ndarray,
              r0: Rotations, *, options: model.RunOptions,
              weight_spec: quant.QuantSpec | None, steps: int, lr: float,
              key: jax.Array, batch_size: int = 4, progress: bool = True,
              resume: str | None = None, deadline: float | None = None,
              remat: bool = False, loss: str = "ce",
              scale_lr: float | None = None) -> tuple[Rotations, np.ndarray]:
  """SpinQuant: R1 and R2 minimize the quantized network's next-token loss.

  Args:
    base: params from `prepare`.
    config: the model config.
    calib_tokens: int32[n, T] calibration windows.
    r0: the start.
    options: the quantized forward (`rotation.ROTATED` flags plus the
      activation and KV specs), fake-quantized with a straight-through
      estimator.
    weight_spec: RTN weight quantization inside the loss (its MSE clip is
      dropped), or None for float weights (SpinQuant's choice when GPTQ
      quantizes the weights afterwards).
    steps: optimizer steps.
    lr: Adam's peak learning rate.
    key: orders the windows.
    batch_size: windows per step.
    progress: show a progress bar.
    resume: the state file of a run in parts (module docstring), or None.
    deadline: with `resume`, pause after the step that ends past this
      `time.time()`.
    remat: recompute each layer in the backward pass (`model.forward`):
      the step's memory holds one layer's intermediates, not all of them
      (Qwen2.5-1.5B at 4 windows of 2048 asked for 186 GiB without it).
    loss: 'ce' (next-token cross-entropy) or 'kl' (KL divergence from the
      float network's next-token distributions, computed in the same step;
      `core.kl_loss`).
    scale_lr: the log-scales' peak learning rate (None: `lr`).

  Returns:
    (rotations, f32[steps] losses).

  Raises:
    OutOfDeviceMemory: a step did not fit (the message says what to lower).
  """
  n = calib_tokens.shape[0]
  b = min(batch_size, n)
  epochs = math.ceil(steps * b / n)
  order = np.concatenate([np.asarray(jax.random.permutation(k, n))
                          for k in jax.random.split(key, epochs)])
  calib = jnp.asarray(calib_tokens, jnp.int32)
  if weight_spec is not None:
    weight_spec = quant.QuantSpec(
        bits=weight_spec.bits, symmetric=weight_spec.symmetric,
        group_size=weight_spec.group_size)

  def loss_fn(rot, batch):
    base, tokens = batch  # arguments of the jitted step, not constants
    params = fold_into(base, config, rot)
    if weight_spec is not None and weight_spec.enabled:
      params = _rtn_ste(params, weight_spec)
    logits, _ = model.forward(params, tokens, config, options=options,
                              kernels="xla",  # f32 einsum attention
                              remat=remat)
    if loss == "ce":
      return core.next_token_loss(logits, tokens)
    teacher, _ = model.forward(base, tokens, config, options=_BASE,
                               kernels="xla", remat=remat)
    return core.kl_loss(logits, teacher)

  try:
    return _train(
        loss_fn, r0, lambda i: (base, calib[order[i * b:(i + 1) * b]]),
        parameterization="cayley", lr=lr, steps=steps, progress=progress,
        desc=f"learn R (e2e{'' if loss == 'ce' else ', ' + loss})",
        resume=resume, deadline=deadline, scale_lr=scale_lr)
  except jax.errors.JaxRuntimeError as e:
    oom = _out_of_memory(e, b, calib.shape[1], remat)
    if oom is None:
      raise
    raise oom from e


def learn(params: Params, config: LlamaConfig, calib_tokens: np.ndarray, *,
          objective: str, steps: int, lr: float | None = None,
          key: jax.Array, options: model.RunOptions = rotation.ROTATED,
          weight_spec: quant.QuantSpec | None = None,
          batch_size: int = 4, start: Rotations | None = None,
          scales: bool = False,
          progress: bool = True, resume: str | None = None,
          time_budget_s: float | None = None, remat: bool = False,
          loss: str = "ce", scale_lr: float | None = None
          ) -> tuple[Rotations, np.ndarray]:
  """Learns R1 and R2 from QuaRot's randomized Hadamard start.

  Args:
    params: float params.
    config: the model config.
    calib_tokens: int32[n, T] calibration windows.
    objective: 'whip', 'qerror' or 'e2e' (module docstring).
    steps: optimizer steps (0 returns the start).
    lr: peak learning rate (None: `DEFAULT_LR`).
    key: seeds R1's start (as `rotation.rotate`) and the data order.
    options: the quantized forward ('e2e'; 'qerror' reads its activation
      and value specs; 'whip' ignores it).
    weight_spec: RTN weights in the 'e2e' loss, or None (float weights).
    batch_size: windows per 'e2e' step.
    start: the rotations to start from (default `initial_rotations(config,
      key, scales=scales)`, QuaRot's).
    scales: 'e2e' also learns channel scales on the norm -> linear paths
      (`Rotations.scales`, OSTQuant's), starting at 1.
    progress: show progress bars.
    resume: a state file, to learn in parts (module docstring): resumed
      from when it exists, removed when learning ends.
    time_budget_s: with `resume`, pause after the first step that ends
      this many seconds after this call (`LearningPaused`; preparing the
      inputs counts); None: no limit.
    remat: 'e2e' recomputes each layer in the backward pass (`learn_e2e`).
    loss: what 'e2e' minimizes, one of `LOSSES` (`learn_e2e`).
    scale_lr: the learned scales' own peak learning rate (None: `lr`).

  Returns:
    (rotations to `fold`, f32[steps] training losses).

  Raises:
    ValueError: unknown objective or loss, scales or a 'kl' loss with an
      objective other than 'e2e', a scale_lr without scales or not
      positive, negative steps, no calibration windows, a `resume` file of
      another run, or a time budget that is negative or has no `resume`
      file.
    LearningPaused: the time budget was spent; the state is in `resume`.
    OutOfDeviceMemory: an 'e2e' step did not fit in device memory.
  """
  deadline = None if time_budget_s is None else time.time() + time_budget_s
  if objective not in OBJECTIVES:
    raise ValueError(f"{objective=} must be one of {OBJECTIVES}")
  if loss not in LOSSES:
    raise ValueError(f"{loss=} must be one of {LOSSES}")
  if loss != "ce" and objective != "e2e":
    raise ValueError(f"{loss=} needs objective='e2e', got {objective=}")
  if steps < 0:
    raise ValueError(f"{steps=} must be >= 0")
  if time_budget_s is not None:
    if resume is None:
      raise ValueError(f"{time_budget_s=} needs a resume file to save the"
                       " learning state to")
    if time_budget_s < 0:
      raise ValueError(f"{time_budget_s=} must be >= 0 (seconds)")
  calib_tokens = np.asarray(calib_tokens, np.int32)
  if calib_tokens.ndim != 2 or calib_tokens.shape[0] == 0:
    raise ValueError(f"calib_tokens must be int32[n>0, T], got"
                     f" {calib_tokens.shape}")
  lr = DEFAULT_LR if lr is None else lr
  # R1 starts from `key` itself, as in `rotation.rotate`.
  r0 = (initial_rotations(config, key, scales=scales) if start is None
        else start)
  if r0.scales is not None and objective != "e2e":
    raise ValueError(f"learned scales need objective='e2e', got {objective=}"
                     " (the calibration objectives see one rotation's"
                     " inputs, not the linears a scale moves into)")
  if scale_lr is not None:
    if r0.scales is None:
      raise ValueError(f"{scale_lr=} needs learned scales (scales=True)")
    if not 0 < scale_lr < float("inf"):
      raise ValueError(f"{scale_lr=} must be a positive number")
  data_key = jax.random.fold_in(key, 1)
  if steps == 0:
    return r0, np.zeros((0,), np.float32)
  base = prepare(params)
  if objective in ("whip", "qerror"):
    return learn_calibration(base, config, calib_tokens, r0,
                             objective=objective, options=options,
                             steps=steps, lr=lr, key=data_key,
                             progress=progress, resume=resume,
                             deadline=deadline)
  return learn_e2e(base, config, calib_tokens, r0, options=options,
                   weight_spec=weight_spec, steps=steps, lr=lr,
                   key=data_key, batch_size=batch_size, progress=progress,
                   resume=resume, deadline=deadline, remat=remat, loss=loss,
                   scale_lr=scale_lr)
