"""The QuaRot recipe: rotate, then quantize weights, activations and KV cache.

`quantize(params, config, qconfig, calib_tokens)` returns params whose
decoder linears hold (fake-)quantized weights plus the `RunOptions` that
make the forward quantize activations and the KV cache and apply the online
Hadamards. lm_head and embeddings stay in float, as in the paper.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax import gptq
from quarot_jax import key_center
from quarot_jax import learned_rotation
from quarot_jax import model
from quarot_jax import qlinear
from quarot_jax import quant
from quarot_jax import rotation
from quarot_jax.config import LlamaConfig

LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"),
           ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
ROTATE_MODES = ("hadamard", "random", "learned")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuaRotConfig:
  """How to rotate and quantize a model. 16 bits means "not quantized".

  Attributes:
    w_bits: weight bits.
    a_bits: activation bits (input of every decoder linear, per token).
    k_bits: key cache bits (asymmetric, per token and head).
    v_bits: value cache bits.
    w_method: 'rtn' or 'gptq'.
    w_groupsize: weight group size along the input axis (None: per channel).
    w_asym: asymmetric weights.
    w_clip: search the weight clipping range (MSE), as QuaRot's `--w_clip`.
    a_clip: activation clip ratio (QuaRot: 0.9).
    kv_clip: KV cache clip ratio (QuaRot: 0.95).
    rotate: apply QuaRot's rotations.
    rotate_mode: 'hadamard', 'random' (orthogonal), or 'learned': R1 and
      the per-head R2 start from the randomized Hadamard and are optimized
      on the calibration windows (`learned_rotation`).
    rotation_objective: what 'learned' minimizes: 'whip' (DartQuant's
      distribution calibration of each rotation on cached activations),
      'qerror' (the quantization error of those rotated activations) or
      'e2e' (SpinQuant's next-token loss of the quantized network).
    rotation_steps: optimizer steps of 'learned'.
    rotation_lr: peak learning rate of 'learned' (Adam, cosine decay).
    rotation_batch_size: calibration windows per 'e2e' step (its memory
      grows with it; the other objectives ignore it).
    learn_scales: 'e2e' also learns a positive scale per channel of every
      norm -> linear path (OSTQuant's learnable scaling, folded into the
      norm's weight and the linears' rows; `rotation.scale_norm_outputs`).
    scale_lr_ratio: with learn_scales, the scales' peak learning rate as a
      multiple of rotation_lr (1: one rate for all).
    rotation_loss: what 'e2e' minimizes: 'ce' (SpinQuant's next-token
      cross-entropy) or 'kl' (KL divergence from the float network's
      next-token distributions, OSTQuant's; one more forward a step).
    rotation_remat: 'e2e' recomputes each layer in the backward pass, so a
      step holds one layer's intermediates instead of all of them (about
      a third more compute; the same rotations, so not in `rotation_key`).
    percdamp: GPTQ dampening.
    act_order: GPTQ column reordering.
    seed: seeds the rotation.
    center_keys: subtract each layer's and kv head's mean key (measured on
      the calibration windows) from the cached keys (`key_center`):
      exactly invariant in float, and it keeps a large constant key offset
      (Qwen2's k_proj bias) out of the KV quantizer's range.
  """

  w_bits: int = 16
  a_bits: int = 16
  k_bits: int = 16
  v_bits: int = 16
  w_method: str = "rtn"
  w_groupsize: int | None = None
  w_asym: bool = False
  w_clip: bool = True
  a_clip: float = 0.9
  kv_clip: float = 0.95
  rotate: bool = True
  rotate_mode: str = "hadamard"
  rotation_objective: str = "whip"
  rotation_steps: int = 100
  rotation_lr: float = 1e-3
  rotation_batch_size: int = 4
  learn_scales: bool = False
  scale_lr_ratio: float = 1.0
  rotation_loss: str = "ce"
  rotation_remat: bool = False
  percdamp: float = 0.01
  act_order: bool = True
  seed: int = 0
  center_keys: bool = False

  def __post_init__(self):
    def is_int(x):
      return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    for name in ("w_bits", "a_bits", "k_bits", "v_bits"):
      bits = getattr(self, name)
      if not is_int(bits) or (bits != 16 and not 2 <= bits <= 8):
        raise ValueError(f"{name}={bits!r} must be an int in 2..8, or 16 for"
                         " none")
    if self.w_groupsize is not None and (not is_int(self.w_groupsize)
                                         or self.w_groupsize <= 0):
      raise ValueError(f"w_groupsize={self.w_groupsize!r} must be a positive"
                       " int, or None for per channel")
    for name in ("a_clip", "kv_clip"):
      ratio = getattr(self, name)
      if (not isinstance(ratio, (int, float, np.number))
          or isinstance(ratio, bool) or not 0 < ratio <= 1):
        raise ValueError(f"{name}={ratio!r} must be a number in (0, 1]")
    for name in ("center_keys", "rotation_remat", "learn_scales"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
    if not is_int(self.seed):
      raise ValueError(f"seed={self.seed!r} must be an int")
    if self.w_method not in ("rtn", "gptq"):
      raise ValueError(f"w_method={self.w_method!r} must be 'rtn' or 'gptq'")
    if self.rotate_mode not in ROTATE_MODES:
      raise ValueError(
          f"rotate_mode={self.rotate_mode!r} must be one of {ROTATE_MODES}")
    if self.rotation_objective not in learned_rotation.OBJECTIVES:
      raise ValueError(
          f"rotation_objective={self.rotation_objective!r} must be one of"
          f" {learned_rotation.OBJECTIVES}")
    if not is_int(self.rotation_steps) or self.rotation_steps < 0:
      raise ValueError(
          f"rotation_steps={self.rotation_steps!r} must be an int >= 0")
    if (not isinstance(self.rotation_lr, (int, float, np.number))
        or isinstance(self.rotation_lr, bool)
        or not 0 < self.rotation_lr < float("inf")):
      raise ValueError(
          f"rotation_lr={self.rotation_lr!r} must be a positive number")
    if not is_int(self.rotation_batch_size) or self.rotation_batch_size < 1:
      raise ValueError(f"rotation_batch_size={self.rotation_batch_size!r}"
                       " must be an int >= 1")
    learned_e2e = (self.rotate and self.rotate_mode == "learned"
                   and self.rotation_objective == "e2e")
    if self.learn_scales and not learned_e2e:
      raise ValueError(
          "learn_scales=True needs rotate=True, rotate_mode='learned' and"
          f" rotation_objective='e2e', got rotate={self.rotate},"
          f" rotate_mode={self.rotate_mode!r},"
          f" rotation_objective={self.rotation_objective!r}")
    if (not isinstance(self.scale_lr_ratio, (int, float, np.number))
        or isinstance(self.scale_lr_ratio, bool)
        or not 0 < self.scale_lr_ratio < float("inf")):
      raise ValueError(f"scale_lr_ratio={self.scale_lr_ratio!r} must be a"
                       " positive number")
    if self.scale_lr_ratio != 1 and not self.learn_scales:
      raise ValueError(f"scale_lr_ratio={self.scale_lr_ratio!r} needs"
                       " learn_scales=True (it sets the scales' rate)")
    if self.rotation_loss not in learned_rotation.LOSSES:
      raise ValueError(f"rotation_loss={self.rotation_loss!r} must be one of"
                       f" {learned_rotation.LOSSES}")
    if self.rotation_loss != "ce" and not learned_e2e:
      raise ValueError(
          f"rotation_loss={self.rotation_loss!r} needs rotate=True,"
          " rotate_mode='learned' and rotation_objective='e2e', got"
          f" rotate={self.rotate}, rotate_mode={self.rotate_mode!r},"
          f" rotation_objective={self.rotation_objective!r}")

  @property
  def weight_spec(self) -> quant.QuantSpec:
    return quant.QuantSpec(bits=self.w_bits, symmetric=not self.w_asym,
                           group_size=self.w_groupsize,
                           mse_clip=self.w_clip)

  def run_options(self, head_dim: int) -> model.RunOptions:
    """The forward options this config needs."""
    a = quant.QuantSpec(bits=self.a_bits, clip_ratio=self.a_clip)
    k = quant.QuantSpec(bits=self.k_bits, symmetric=False,
                        group_size=head_dim, clip_ratio=self.kv_clip)
    v = dataclasses.replace(k, bits=self.v_bits)
    return model.RunOptions(
        online_had_down=self.rotate, online_had_o=self.rotate,
        qk_had=self.rotate,
        a_spec=a if a.enabled else None,
        k_spec=k if k.enabled else None,
        v_spec=v if v.enabled else None)

  @property
  def needs_calibration(self) -> bool:
    """Whether `quantize` needs calibration windows: GPTQ weights, learned
    rotations or key centers."""
    return ((self.w_method == "gptq" and self.w_bits < 16)
            or (self.rotate and self.rotate_mode == "learned")
            or self.center_keys)

  def describe(self) -> str:
    """A short label such as 'W4A4KV4 gptq rot'."""
    kv = (f"KV{self.k_bits}" if self.k_bits == self.v_bits
          else f"K{self.k_bits}V{self.v_bits}")
    g = f" g{self.w_groupsize}" if self.w_groupsize else ""
    asym = " asym" if self.w_asym else ""
    method = f" {self.w_method}{g}{asym}" if self.w_bits < 16 else ""
    rot = f" rot-{self.rotate_mode}" if self.rotate else " norot"
    if self.rotate and self.rotate_mode == "learned":
      rot += f"-{self.rotation_objective}{self.rotation_steps}"
      if self.rotation_objective == "e2e" and self.rotation_batch_size != 4:
        rot += f" b{self.rotation_batch_size}"
      if self.rotation_loss != "ce":
        rot += f"-{self.rotation_loss}"
      if self.learn_scales:
        rot += "+s" + ("" if self.scale_lr_ratio == 1
                       else f"{self.scale_lr_ratio:g}")
    kc = " kc" if self.center_keys else ""
    return f"W{self.w_bits}A{self.a_bits}{kv}{method}{rot}{kc}"


def _e2e_weight_spec(qconfig: QuaRotConfig) -> quant.QuantSpec | None:
  """RTN weights inside the 'e2e' loss, or None for float weights.

  As SpinQuant: weights are fake-quantized while learning only when RTN
  quantizes them afterwards, or when nothing else is quantized (W4A16);
  before GPTQ the rotations see float weights and quantized activations.
  Learned channel scales always see RTN weights: against float weights a
  weight column absorbs any scale for free, and the scales ran off to 552
  on SmolLM2 W4A4KV4, which GPTQ's per-row grids then could not hold
  (perplexity 212; H100, 2026-12-06).
  """
  nothing_else = qconfig.a_bits == qconfig.k_bits == qconfig.v_bits == 16
  if qconfig.w_bits < 16 and (qconfig.w_method == "rtn" or nothing_else
                              or qconfig.learn_scales):
    return qconfig.weight_spec
  return None


def rotation_key(qconfig: QuaRotConfig) -> tuple[Any, ...] | None:
  """Configs with the same key learn the same rotations (None: not learned).

  A sweep can learn once per key and pass the result to `quantize`.
  """
  if not qconfig.rotate or qconfig.rotate_mode != "learned":
    return None
  key = (qconfig.rotation_objective, qconfig.rotation_steps,
         qconfig.rotation_lr, qconfig.seed)
  if qconfig.rotation_objective == "qerror":  # it sees these quantizers
    key += (qconfig.a_bits, qconfig.v_bits, qconfig.a_clip, qconfig.kv_clip)
  elif qconfig.rotation_objective == "e2e":  # it sees all of them
    key += (qconfig.a_bits, qconfig.k_bits, qconfig.v_bits, qconfig.a_clip,
            qconfig.kv_clip, _e2e_weight_spec(qconfig))
    if qconfig.center_keys:  # old keys (and saved rotations) stay valid
      key += ("center_keys",)
    if qconfig.rotation_batch_size != 4:  # likewise
      key += (("batch", qconfig.rotation_batch_size),)
    if qconfig.learn_scales:  # likewise
      key += ("scales",)
      if qconfig.scale_lr_ratio != 1:
        key += (("scale_lr_ratio", qconfig.scale_lr_ratio),)
    if qconfig.rotation_loss != "ce":
      key += (("loss", qconfig.rotation_loss),)
  return key


def learn_rotations(params: Any, config: LlamaConfig, qconfig: QuaRotConfig,
                    calib_tokens: np.ndarray | None, *,
                    progress: bool = True, return_losses: bool = False,
                    resume: str | None = None,
                    time_budget_s: float | None = None):
  """Learns the R1 and R2 of `rotate_mode='learned'` (see `quantize`).

  With `center_keys` the 'e2e' objective runs the model with its key
  centers (`key_center`; R1 and R2 leave the keys as they are, so the
  centers of the unrotated model are the rotated model's too).

  Args:
    params: float params.
    config: the model config.
    qconfig: a config with rotate_mode='learned'.
    calib_tokens: int32[n, T] calibration windows.
    progress: show progress bars.
    return_losses: also return the training losses.
    resume: learn in parts through this state file (`learned_rotation`).
    time_budget_s: with `resume`, pause after the first step that ends
      this many seconds after this call (key centering counts).

  Returns:
    The rotations, for `quantize(..., rotations=...)`; with
    `return_losses`, (rotations, f32[steps] losses).

  Raises:
    ValueError: no calibration tokens.
    learned_rotation.LearningPaused: the time budget was spent.
  """
  deadline = None if time_budget_s is None else time.time() + time_budget_s
  if calib_tokens is None:
    raise ValueError("rotate_mode='learned' needs calib_tokens")
  options = qconfig.run_options(config.head_dim)
  if qconfig.center_keys and qconfig.rotation_objective == "e2e":
    params, _ = model.unwrap(params)
    params = key_center.fold(params, key_center.calibrate(
        params, config, calib_tokens, options=options, progress=progress))
  rotations, losses = learned_rotation.learn(
      params, config, calib_tokens, objective=qconfig.rotation_objective,
      steps=qconfig.rotation_steps, lr=qconfig.rotation_lr,
      key=jax.random.key(qconfig.seed), options=options,
      weight_spec=_e2e_weight_spec(qconfig),
      batch_size=qconfig.rotation_batch_size, scales=qconfig.learn_scales,
      progress=progress, resume=resume, remat=qconfig.rotation_remat,
      loss=qconfig.rotation_loss,
      scale_lr=(qconfig.rotation_lr * qconfig.scale_lr_ratio
                if qconfig.learn_scales and qconfig.scale_lr_ratio != 1
                else None),
      time_budget_s=(None if deadline is None
                     else max(0.0, deadline - time.time())))
  return (rotations, losses) if return_losses else rotations


def rtn_quantize_params(params: Any, spec: quant.QuantSpec) -> Any:
  """Round-to-nearest fake quantization of every decoder linear's kernel."""
  fq = jax.jit(lambda w: quant.fake_quant_layers(w, spec))
  params = jax.tree.map(lambda a: a, params)
  for block, name in LINEARS:
    node = params["layers"][block][name]
    node["kernel"] = fq(jnp.asarray(node["kernel"], jnp.float32))
  return params


def check_packable(qconfig: QuaRotConfig) -> None:
  """Raises unless `quantize(..., packed=True)` can run this config.

  Raises:
    NotImplementedError: the int4 kernels need 4-bit weights (asymmetric
      only with 16-bit activations) and 4- or 16-bit activations; KV bits
      must be 4 or 16.
  """
  problems = [f"{name}={value!r} ({need})"
              for name, value, need in packing_problems(qconfig)]
  if problems:
    raise NotImplementedError(
        "packed (real int4) quantization does not support "
        + ", ".join(problems) + "; use packed=False to simulate it")


def packing_problems(qconfig: QuaRotConfig) -> list[tuple[str, Any, str]]:
  """What keeps `qconfig` from running packed: (field, value, what it needs).

  Empty when `quantize(..., packed=True)` can run it. Command lines word
  these with their own flag names.
  """
  problems = []
  if qconfig.w_bits != 4:
    problems.append(("w_bits", qconfig.w_bits, "needs 4"))
  if qconfig.w_asym and qconfig.a_bits != 16:
    problems.append(("w_asym", True,
                     "needs symmetric weights with 4-bit activations"))
  if qconfig.w_groupsize is not None and qconfig.w_groupsize % 2:
    problems.append(("w_groupsize", qconfig.w_groupsize,
                     "needs per-channel or an even group size"))
  for name in ("a_bits", "k_bits", "v_bits"):
    if getattr(qconfig, name) not in (4, 16):
      problems.append((name, getattr(qconfig, name), "needs 4 or 16"))
  return problems


def quantize(params: Any, config: LlamaConfig, qconfig: QuaRotConfig,
             calib_tokens: np.ndarray | None = None, *,
             packed: bool = False,
             rotations: learned_rotation.Rotations | None = None,
             rotation_tp: int = 1,
             progress: bool = True) -> tuple[Any, model.RunOptions]:
  """Rotates and quantizes a model.

  Args:
    params: float params, or Flax variables `{"params": params}` (then the
      result is wrapped the same way).
    config: the model config.
    qconfig: what to do.
    calib_tokens: int32[n, T] calibration windows (GPTQ, and learning
      rotations).
    packed: store decoder linears as packed int4 (`qlinear`), so `forward`
      runs the int4 kernels and generation keeps a packed KV4 cache;
      otherwise quantization is simulated in float.
    rotations: with rotate_mode='learned', rotations already learned for
      this config (`learn_rotations`); None learns them here.
    rotation_tp: fold block-diagonal online Hadamards, one per
      tensor-parallel shard (`rotation.rotate(..., tp=rotation_tp)`); the
      options then carry `had_blocks=rotation_tp` and
      `row_groups=rotation_tp`: o_proj and down_proj quantize their input
      with one scale per token and shard, which is what the packed model
      on a mesh of that many devices computes (and what its shards can
      compute without another all-reduce). 1: full width, one scale per
      token.
    progress: show progress bars.

  Returns:
    (params, options): run the model with `forward(..., options=options)`.

  Raises:
    ValueError: GPTQ, learned rotations or center_keys without calibration
      tokens, an
      unsupported size (a `rotation_tp` block included), or `rotation_tp`
      != 1 without rotation.
    NotImplementedError: `packed` with a config the kernels do not run,
      or learned rotations with `rotation_tp` > 1.
  """
  params, wrap = model.unwrap(params)
  if packed:
    check_packable(qconfig)
  options = qconfig.run_options(config.head_dim)
  if rotation_tp != 1:
    if not qconfig.rotate:
      raise ValueError(f"{rotation_tp=} needs rotate=True")
    if rotation_key(qconfig) is not None:
      raise NotImplementedError(
          f"{rotation_tp=}: learned rotations fold full width only")
    options = dataclasses.replace(options, had_blocks=rotation_tp,
                                  row_groups=rotation_tp)
  if qconfig.rotate and qconfig.rotate_mode == "learned":
    if rotations is None:
      rotations = learn_rotations(params, config, qconfig, calib_tokens,
                                  progress=progress)
    params = learned_rotation.fold(params, config, rotations)
  elif qconfig.rotate:
    params = rotation.rotate(params, config, jax.random.key(qconfig.seed),
                             mode=qconfig.rotate_mode, tp=rotation_tp)
  else:
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  if qconfig.center_keys:
    if calib_tokens is None:
      raise ValueError("center_keys=True needs calib_tokens")
    params = key_center.fold(params, key_center.calibrate(
        params, config, calib_tokens, options=options, progress=progress))
  if qconfig.w_bits < 16:
    if qconfig.w_method == "gptq":
      if calib_tokens is None:
        raise ValueError("w_method='gptq' needs calib_tokens")
      params = gptq.gptq_quantize_params(
          params, config, calib_tokens, qconfig.weight_spec, options=options,
          percdamp=qconfig.percdamp, act_order=qconfig.act_order,
          progress=progress, return_qarrays=packed)
      if packed:
        params, qarrays = params
        params = qlinear.pack_params(params, qarrays)
    elif packed:
      params = qlinear.pack_params(params, qlinear.quantize_weights_rtn(
          params, LINEARS, qconfig.weight_spec))
    else:
      params = rtn_quantize_params(params, qconfig.weight_spec)
  return wrap(params), options
