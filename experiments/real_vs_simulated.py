r"""The real int4 path (packed weights, Pallas kernels, KV4 cache) against
simulated quantization on the real model: perplexity and greedy tokens.

  python -m experiments.real_vs_simulated --w_method=gptq --out_dir=results

Both paths use the same rotation and the same weight codes; the goal is
perplexity within 0.5% and greedy tokens agreeing on >= 99% of positions.
The control is the simulated model against itself with every kernel moved
by one ulp (`agreement.ulp_perturbed`): how far rounding noise alone moves a
4-bit model.
Learned rotations (`--rotate_mode=learned`, issue #16's goal: packed within
0.5% of simulated) come from --rotations_dir when `experiments.accuracy`
saved them there with the same rotation flags, else they are learned here:

  python -m experiments.accuracy --sweep=learned --learned_rows=w4a4kv4 \
      --objectives=e2e --rotation_steps=900 --rotation_lr=1.5e-2 \
      --learn_only --rotations_dir=DIR
  python -m experiments.real_vs_simulated --rotate --rotate_mode=learned \
      --rotation_objective=e2e --rotation_steps=900 --rotation_lr=1.5e-2 \
      --rotations_dir=DIR --max_windows=32 --new_tokens=0

(--new_tokens=0: perplexities only, ~3 min on an H200 after the learning;
the greedy comparison of 4 prompts x 128 tokens adds over 400 s.)

Appends a record to --out_dir/real_vs_simulated.jsonl.
"""

import datetime
import os
import shlex
import sys
import time

from absl import app
from absl import flags
import jax

from experiments.lab import agreement
from experiments.lab import benchmarking
from experiments.lab import models
from quarot_jax import cli_flags
from quarot_jax import evaluate
from quarot_jax import generation
from quarot_jax import kernels as kernels_lib
from quarot_jax import qlinear
from quarot_jax import quarot
from quarot_jax import rotation_cache
from quarot_jax import sweep

_MODEL = flags.DEFINE_string("model", None, "Checkpoint, HF dir or .gguf;"
                             " default: the embedded SmolLM2-135M.")
_QUANT = cli_flags.define_quant_flags(
    w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq")
_KERNELS = cli_flags.define_kernels_flag()
_SEQLEN = flags.DEFINE_integer("seqlen", 2048, "Window length.")
_WINDOWS = flags.DEFINE_integer("max_windows", 40, "Eval windows.")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Greedy prompts (eval text).")
_NEW = flags.DEFINE_integer(
    "new_tokens", 256, "Greedy tokens per prompt; 0 skips the greedy"
    " comparison (perplexities only: the greedy part of 4 x 128 tokens took"
    " over 400 s on an H200).", lower_bound=0)
_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_ROTATIONS_DIR = flags.DEFINE_string(
    "rotations_dir", None, "With --rotate_mode=learned: load the rotations"
    " saved here (experiments.accuracy --rotations_dir, same rotation flags),"
    " or learn and save them; None: learn them, save nothing.")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", ["default", "high", "highest"],
    "jax_default_matmul_precision. The simulated path multiplies floats: on a"
    " GPU 'default' means TF32, whose rounding flips 4-bit activation codes"
    " that the packed path's exact integer matmuls do not.")


def _record(case: str, ppl: dict, agree: dict, ctrl: dict, *,
            eval_windows: int, seconds: float, command: str,
            rotation: dict) -> dict:
  """The JSONL record: perplexities, agreement, and the control's."""
  return {
      "benchmark": "real_vs_simulated", "case": case, **rotation,
      "ppl_simulated": round(ppl["simulated"], 4),
      "ppl_packed": round(ppl["packed"], 4),
      "ppl_rel_diff": round(ppl["packed"] / ppl["simulated"] - 1, 5),
      "ppl_control": round(ppl["control"], 4),
      "control_ppl_rel_diff": round(ppl["control"] / ppl["simulated"] - 1, 5),
      "control_free_running": ctrl.get("free_running"),
      "control_teacher_forced": ctrl.get("teacher_forced"),
      "eval_windows": eval_windows, "seqlen": _SEQLEN.value, **agree,
      "matmul_precision": _PRECISION.value, "seconds": round(seconds, 1),
      "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
      "date": datetime.date.today().isoformat(), "command": command}


def _done(what: str, start: float) -> None:
  """One line per finished phase, so a run stopped by a time limit still
  says how far it got."""
  print(f"{what}: done at {time.time() - start:.0f} s", flush=True)


def _greedy(simulated, packed, control, config, evals, *, options,
            kernels, start: float) -> tuple[dict, dict]:
  """Greedy agreement of packed and of the control with simulated; empty
  (no greedy fields in the record) when --new_tokens=0."""
  if _NEW.value == 0:
    return {}, {}
  prompts = [list(w[:64]) for w in evals[:_PROMPTS.value]]
  want = generation.generate_tokens(simulated, config, prompts,
                                    max_new_tokens=_NEW.value,
                                    options=options, kernels=kernels)
  _done("greedy simulated", start)
  agree = agreement.greedy_agreement(simulated, packed, config, prompts,
                                     options=options, kernels=kernels,
                                     max_new_tokens=_NEW.value,
                                     reference_tokens=want)
  _done("greedy packed vs simulated", start)
  ctrl = agreement.greedy_agreement(simulated, control, config, prompts,
                                    options=options, kernels=kernels,
                                    max_new_tokens=_NEW.value,
                                    reference_tokens=want)
  return agree, ctrl


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  command = shlex.join(["python", "-m", "experiments.real_vs_simulated"]
                       + sys.argv[1:])
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  kernels = kernels_lib.resolve(_KERNELS.value)
  qconfig = cli_flags.quarot_config({k: h.value for k, h in _QUANT.items()})
  if (_ROTATIONS_DIR.value is not None
      and quarot.rotation_key(qconfig) is None):
    raise app.UsageError("--rotations_dir needs learned rotations: --rotate"
                         " --rotate_mode=learned")
  params, config, tokenizer, name = models.load_model(_MODEL.value)
  nsamples = _QUANT["nsamples"].value if qconfig.needs_calibration else 0
  evals, calib = sweep.windows(
      tokenizer, seqlen=_SEQLEN.value, max_windows=_WINDOWS.value,
      nsamples=nsamples)
  start = time.time()
  rotations, rotation = None, {"rotate_mode": qconfig.rotate_mode
                               if qconfig.rotate else None}
  if quarot.rotation_key(qconfig) is not None:
    rotations, rotation_s, loaded = rotation_cache.learn_or_load(
        params, config, qconfig, calib, directory=_ROTATIONS_DIR.value,
        model_name=name)
    rotation.update(rotation_objective=qconfig.rotation_objective,
                    rotation_steps=qconfig.rotation_steps,
                    rotation_s=round(rotation_s, 1), rotation_loaded=loaded)
  packed, options = quarot.quantize(params, config, qconfig, calib,
                                    packed=True, rotations=rotations)
  _done(f"quantized ({qconfig.describe()})", start)
  # The simulated twin holds exactly the packed codes, dequantized.
  simulated = qlinear.dequantize_params(packed)
  control = agreement.ulp_perturbed(simulated, jax.random.key(1))
  ppl = {}
  for label, p in (("simulated", simulated), ("packed", packed),
                   ("control", control)):
    ppl[label] = evaluate.perplexity(p, config, evals, options=options,
                                     kernels=kernels)["ppl"]
    _done(f"{label} perplexity {ppl[label]:.4f}", start)
  agree, ctrl = _greedy(simulated, packed, control, config, evals,
                        options=options, kernels=kernels, start=start)
  record = _record(f"{name} {qconfig.describe()}", ppl, agree, ctrl,
                   eval_windows=int(evals.shape[0]),
                   seconds=time.time() - start, command=command,
                   rotation=rotation)
  print(record)
  benchmarking.append_jsonl(os.path.join(_OUT.value,
                                         "real_vs_simulated.jsonl"), [record])


if __name__ == "__main__":
  app.run(main)
