"""The one flag vocabulary of the command lines: how to quantize, which kernels.

Every CLI (`experiments/*.py`, `convert/hf_to_orbax.py`) that quantizes a
model defines its flags here, so `--w_bits=4 --w_method=gptq` means the same
everywhere. Each quantization flag is named after the `QuaRotConfig` field it
sets (no rename layer), plus `nsamples` (GPTQ calibration windows),
`--kernels` (a `kernels.SETTINGS` word) and `--tp` (tensor-parallel devices).

The library never reads `FLAGS`: `define_*` only defines flags and returns
their holders, and the CLI passes the values back explicitly:

  _QUANT = cli_flags.define_quant_flags(w_bits=4, w_method="gptq")
  _KERNELS = cli_flags.define_kernels_flag()
  ...
  qconfig = cli_flags.quarot_config({k: h.value for k, h in _QUANT.items()})
"""

import dataclasses
from typing import Any, Mapping

from absl import flags
import jax

from quarot_jax import data
from quarot_jax import kernels
from quarot_jax import learned_rotation
from quarot_jax import quarot
from quarot_jax import sharding
from quarot_jax.quarot import QuaRotConfig

# Flag name -> help. Names are `QuaRotConfig` fields, except `nsamples`.
_HELP = {
    "w_bits": "Weight bits (16: not quantized).",
    "a_bits": "Activation bits, at the input of every decoder linear.",
    "k_bits": "Key cache bits.",
    "v_bits": "Value cache bits.",
    "w_method": "Weight quantizer.",
    "w_groupsize": "Weight group size along the input axis (default: per"
                   " output channel).",
    "w_asym": "Asymmetric weights.",
    "w_clip": "MSE search of the weight clipping range.",
    "a_clip": "Activation clip ratio.",
    "kv_clip": "KV cache clip ratio.",
    "rotate": "Apply QuaRot's rotations.",
    "rotate_mode": "Residual rotation; 'learned' optimizes R1 and R2 from"
                   " the randomized Hadamard on calibration windows.",
    "rotation_objective": "With --rotate_mode=learned: whip (DartQuant's"
                          " distribution calibration), qerror (quantization"
                          " error of the rotated activations) or e2e"
                          " (SpinQuant's quantized next-token loss).",
    "rotation_steps": "With --rotate_mode=learned: optimizer steps.",
    "rotation_lr": "With --rotate_mode=learned: peak learning rate (Adam).",
    "rotation_batch_size": "With --rotation_objective=e2e: calibration"
                           " windows per step (lower it if the model does"
                           " not fit in memory).",
    "learn_scales": "With --rotation_objective=e2e: also learn a scale per"
                    " channel of each norm -> linear path (OSTQuant's"
                    " learnable scaling, folded into the norm and linears),"
                    " learned against RTN weights even before GPTQ.",
    "scale_lr_ratio": "With --learn_scales: the scales' peak learning rate"
                      " as a multiple of --rotation_lr.",
    "rotation_loss": "With --rotation_objective=e2e: ce (next-token"
                     " cross-entropy, SpinQuant's) or kl (KL divergence"
                     " from the float model's next-token distributions,"
                     " OSTQuant's; one more forward a step).",
    "rotation_remat": "With --rotation_objective=e2e: recompute each layer"
                      " in the backward pass (memory of one layer's"
                      " intermediates, ~1/3 more compute).",
    "percdamp": "GPTQ dampening, a fraction of the mean Hessian diagonal.",
    "act_order": "GPTQ column reordering by Hessian diagonal.",
    "seed": "Seeds the random rotation signs.",
    "center_keys": "Subtract each layer's mean key (calibration windows)"
                   " from the cached keys before KV quantization: exact in"
                   " float; needed by models with a large k_proj bias"
                   " (Qwen2).",
    "nsamples": "GPTQ (and learned-rotation) calibration windows"
                " (enwiki-gensim).",
}
_ENUMS = {"w_method": ("rtn", "gptq"), "rotate_mode": quarot.ROTATE_MODES,
          "rotation_objective": learned_rotation.OBJECTIVES,
          "rotation_loss": learned_rotation.LOSSES}
_CALIBRATION_DEFAULTS = {"nsamples": 128}
QUANT_FLAGS = tuple(_HELP)


def define_quant_flags(
    flag_values: flags.FlagValues = flags.FLAGS, **defaults: Any
) -> dict[str, flags.FlagHolder]:
  """Defines `QUANT_FLAGS` (in absl's global registry by default).

  Call once per program, at import time of its CLI module.

  Args:
    flag_values: the registry to define them in (tests pass their own).
    **defaults: default values by flag name, overriding `QuaRotConfig`'s
      (and `nsamples=128`); e.g. the converter's `w_bits=4, w_method='gptq'`.

  Returns:
    Flag name -> its `FlagHolder`.

  Raises:
    ValueError: a default names no flag of `QUANT_FLAGS`.
  """
  unknown = sorted(set(defaults) - set(QUANT_FLAGS))
  if unknown:
    raise ValueError(f"{unknown=} are not quantization flags {QUANT_FLAGS}")
  fields = {f.name: f.default for f in dataclasses.fields(QuaRotConfig)}
  values = {**fields, **_CALIBRATION_DEFAULTS, **defaults}
  holders = {}
  for name in QUANT_FLAGS:
    value, help_ = values[name], _HELP[name]
    kw = dict(flag_values=flag_values)
    if name in _ENUMS:
      holders[name] = flags.DEFINE_enum(name, value, _ENUMS[name], help_, **kw)
    elif isinstance(fields.get(name), bool):
      holders[name] = flags.DEFINE_bool(name, value, help_, **kw)
    elif isinstance(fields.get(name), float):
      holders[name] = flags.DEFINE_float(name, value, help_, **kw)
    else:  # ints, and w_groupsize (None by default)
      holders[name] = flags.DEFINE_integer(name, value, help_, **kw)
  return holders


def define_kernels_flag(
    default: str = "auto", flag_values: flags.FlagValues = flags.FLAGS
) -> flags.FlagHolder:
  """Defines `--kernels`: which kernels run (see `quarot_jax.kernels`).

  Args:
    default: one of `kernels.SETTINGS`.
    flag_values: the registry to define it in (tests pass their own).

  Returns:
    Its `FlagHolder`; pass `.value` as the library's `kernels=` argument.
  """
  return flags.DEFINE_enum(
      "kernels", default, kernels.SETTINGS,
      "Which kernels run: auto (Pallas where it runs: Mosaic GPU on Hopper,"
      " Triton on other GPUs, XLA on a CPU), mosaic, triton, xla, reference,"
      " or interpret (Pallas interpret mode).", flag_values=flag_values)


def define_tp_flag(
    default: int = 1, flag_values: flags.FlagValues = flags.FLAGS
) -> flags.FlagHolder:
  """Defines `--tp`: over how many devices generation runs tensor parallel.

  Args:
    default: 1 runs on one device (no mesh).
    flag_values: the registry to define it in (tests pass their own).

  Returns:
    Its `FlagHolder`; pass `mesh(holder.value)` as the library's `mesh=`.
  """
  return flags.DEFINE_integer(
      "tp", default, "Tensor-parallel degree: split the model Megatron style"
      " over the first tp devices (1: one device, no mesh). Heads, KV heads,"
      " FFN and vocabulary sizes must divide by it.", lower_bound=1,
      flag_values=flag_values)


def mesh(tp: int) -> jax.sharding.Mesh | None:
  """The mesh `--tp` asks for: None for 1, else `sharding.make_mesh(tp)`.

  Args:
    tp: the `--tp` value.

  Returns:
    None (one device) or a 1-D mesh with axis 'tp' over `tp` devices.

  Raises:
    ValueError: tp < 1, or fewer than tp devices (the message says how many
      jax sees).
  """
  if tp == 1:
    return None
  return sharding.make_mesh(tp)


def define_eval_text_flag(
    default: str = data.EVAL_TEXT_NAME,
    flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """Defines `--eval_text`: which text is scored (see `quarot_jax.data`).

  Args:
    default: one of `data.TEXTS`.
    flag_values: the registry to define it in (tests pass their own).

  Returns:
    Its `FlagHolder`; pass `.value` as the library's `eval_text=` argument
    (every accuracy record stores it).
  """
  return flags.DEFINE_enum(
      "eval_text", default, data.TEXTS,
      "Evaluation text: enwiki-gensim (Wikipedia prose from the gensim"
      " wheel) or code-sympy (the sympy 1.13.3 wheel's Python sources);"
      " calibration windows always come from enwiki-gensim.",
      flag_values=flag_values)


def quarot_config(values: Mapping[str, Any]) -> QuaRotConfig:
  """The `QuaRotConfig` that flag values describe.

  Args:
    values: flag name -> value, e.g. `{k: h.value for k, h in
      define_quant_flags().items()}`; `nsamples` is not part of the config
      and is left out.

  Returns:
    The config (it checks its own values).

  Raises:
    ValueError: a key names no flag of `QUANT_FLAGS`, or the config rejects
      a value.
  """
  unknown = sorted(set(values) - set(QUANT_FLAGS))
  if unknown:
    raise ValueError(f"{unknown=} are not quantization flags {QUANT_FLAGS}")
  return QuaRotConfig(**{k: v for k, v in values.items()
                         if k not in _CALIBRATION_DEFAULTS})
