"""Accuracy sweeps: the windows they score and the loop that scores configs.

`windows` cuts a text of `data.TEXTS` (enwiki-gensim, code-sympy) into
evaluation and calibration windows (`text_windows`: several texts);
`run_sweep` quantizes a model once per `QuaRotConfig`, evaluates it on each
text and returns one perplexity record per (config, text), rotated
configs once per `rotation_tp` (block-diagonal online Hadamards, one per
tensor-parallel shard; `rotation_tp_problem` says which degrees a model
cannot take); with a
`rotations_dir` it loads learned rotations saved there (`rotation_cache`)
and saves those it learns, and `learn_rotations` learns (or finds) them
without quantizing, so learning and evaluation can run in separate
processes. Writing the
records (JSONL, Markdown, CSV) and the paper's list of configs are lab code
(`experiments/lab/`).
"""

import datetime
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from quarot_jax import data
from quarot_jax import evaluate
from quarot_jax import quarot
from quarot_jax import rotation
from quarot_jax import rotation_cache
from quarot_jax import sharding
from quarot_jax.quarot import QuaRotConfig

_FP = dict(w_bits=16, a_bits=16, k_bits=16, v_bits=16)


def group_size_for(config: Any, preferred: int = 128) -> int:
  """The largest power of two <= `preferred` dividing every linear input.

  QuaRot's "128G" mode assumes widths that are multiples of 128; SmolLM2's
  hidden size 576 is not, so it gets 64.

  Args:
    config: a `LlamaConfig`.
    preferred: the group size wanted.

  Returns:
    The group size.
  """
  widths = (config.hidden_size, config.intermediate_size,
            config.num_attention_heads * config.head_dim)
  g = preferred
  while g > 1 and any(w % g for w in widths):
    g //= 2
  return g


def text_windows(tokenizer: Any, texts: Sequence[str], *, seqlen: int,
                 max_windows: int | None, nsamples: int,
                 calib_text: str = data.EVAL_TEXT_NAME
                 ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """Evaluation windows of several texts and (if nsamples) calibration ones.

  Args:
    tokenizer: the model's tokenizer.
    texts: the texts scored, each one of `data.TEXTS`, no repeats.
    seqlen: tokens per window.
    max_windows: keep the first N evaluation windows of each text (None:
      all).
    nsamples: calibration windows (0: none).
    calib_text: the text calibrated on (enwiki-gensim, as in the paper,
      whatever the evaluation texts).

  Returns:
    ({text: int32[n_text, seqlen] evaluation windows} in the order of
    `texts`, int32[nsamples, seqlen] calibration windows or None); the
    mapping is what `run_sweep` takes to score each config on each text.

  Raises:
    ValueError: no text, a repeated text, or an unknown one.
  """
  texts = list(texts)
  if not texts:
    raise ValueError(f"{texts=} must name at least one of {data.TEXTS}")
  repeated = sorted({t for t in texts if texts.count(t) > 1})
  if repeated:
    raise ValueError(f"{texts=} repeats {repeated}")
  evals = {text: data.eval_windows(tokenizer, seqlen=seqlen,
                                   max_windows=max_windows, text=text)
           for text in texts}
  calib = (data.calibration_windows(tokenizer, nsamples=nsamples,
                                    seqlen=seqlen, text=calib_text)
           if nsamples else None)
  return evals, calib


def windows(tokenizer: Any, *, seqlen: int, max_windows: int | None,
            nsamples: int, eval_text: str = data.EVAL_TEXT_NAME,
            calib_text: str = data.EVAL_TEXT_NAME
            ) -> tuple[np.ndarray, np.ndarray | None]:
  """Evaluation windows of one text and (if nsamples) calibration ones.

  Args:
    tokenizer: the model's tokenizer.
    seqlen: tokens per window.
    max_windows: keep the first N evaluation windows (None: all).
    nsamples: calibration windows (0: none).
    eval_text: the text scored, one of `data.TEXTS`.
    calib_text: the text calibrated on (enwiki-gensim, as in the paper,
      whatever the evaluation text).

  Returns:
    (int32[n, seqlen] evaluation windows, int32[nsamples, seqlen]
    calibration windows or None).
  """
  evals, calib = text_windows(tokenizer, [eval_text], seqlen=seqlen,
                              max_windows=max_windows, nsamples=nsamples,
                              calib_text=calib_text)
  return evals[eval_text], calib


def check_rotation_tp(rotation_tp: Sequence[int]) -> list[int]:
  """The tensor-parallel degrees of a sweep, checked.

  Args:
    rotation_tp: degrees, each a positive int, no repeats.

  Returns:
    They, as a list of ints.

  Raises:
    ValueError: none given, one not a positive int, or a repeat.
  """
  tps = list(rotation_tp)
  bad = [tp for tp in tps
         if not isinstance(tp, (int, np.integer)) or isinstance(tp, bool)
         or tp < 1]
  if not tps or bad or len(set(tps)) != len(tps):
    raise ValueError(f"{rotation_tp=} must list distinct positive ints")
  return [int(tp) for tp in tps]


def rotation_tp_problem(params: Any, config: Any, tp: int) -> str | None:
  """Why the block-diagonal rotation for `tp` shards does not fit a model.

  The checks are the library's own: `sharding.check_config` (query and KV
  heads, so that each o_proj block holds whole heads, FFN and vocabulary
  divide by tp) and those of `rotation.rotate(..., tp=tp)` (a Hadamard of
  order N·H/tp and F/tp), traced with `jax.eval_shape` (nothing computed).

  Args:
    params: float params of the model.
    config: its `LlamaConfig`.
    tp: the number of diagonal blocks.

  Returns:
    None if it fits, else the message naming the size at fault.
  """
  try:
    sharding.check_config(config, tp)
    # mode='random': only the online transforms, which tp splits, need
    # Hadamards; the residual rotation is the same at every tp.
    jax.eval_shape(lambda p, key: rotation.rotate(p, config, key,
                                                  mode="random", tp=tp),
                   params, jax.random.key(0))
  except ValueError as e:
    return str(e)
  return None


def _runs(params: Any, config: Any, configs: Sequence[QuaRotConfig],
          rotation_tp: Sequence[int]) -> list[tuple[QuaRotConfig, int]]:
  """(config, tp) pairs to run; prints one line per degree or pair skipped.

  Unrotated configs run once (tp 1); rotated ones once per degree that
  fits the model; learned rotations only at tp 1.
  """
  tps = check_rotation_tp(rotation_tp)
  problems = {}
  if any(c.rotate for c in configs):
    for tp in tps:
      problem = None if tp == 1 else rotation_tp_problem(params, config, tp)
      if problem is not None:
        problems[tp] = problem
        print(f"rotation_tp={tp} skipped: {problem}", flush=True)
  runs = []
  for qconfig in configs:
    if not qconfig.rotate:
      runs.append((qconfig, 1))
      continue
    for tp in tps:
      if tp in problems:
        continue
      if tp != 1 and quarot.rotation_key(qconfig) is not None:
        print(f"rotation_tp={tp} skipped for {qconfig.describe()}: learned"
              " rotations fold full width only (tp 1)", flush=True)
        continue
      runs.append((qconfig, tp))
  return runs


def _record(qconfig: QuaRotConfig, result: dict, fp_ppl: float, *,
            wall_s: float, seqlen: int, nsamples: int, eval_text: str,
            model_name: str, command: str,
            rotation_s: float | None = None,
            rotation_loaded: bool | None = None,
            rotation_tp: int = 1, row_groups: int = 1,
            rotation_calib_texts: Sequence[str] | None = None
            ) -> dict[str, Any]:
  learned = quarot.rotation_key(qconfig) is not None
  return {
      "model": model_name,
      "label": qconfig.describe() + (f" tp{rotation_tp}"
                                     if rotation_tp != 1 else ""),
      "w_bits": qconfig.w_bits, "a_bits": qconfig.a_bits,
      "k_bits": qconfig.k_bits, "v_bits": qconfig.v_bits,
      "w_method": qconfig.w_method if qconfig.w_bits < 16 else "none",
      "w_asym": qconfig.w_asym if qconfig.w_bits < 16 else None,
      "groupsize": qconfig.w_groupsize,
      "rotate": qconfig.rotate, "rotate_mode": qconfig.rotate_mode,
      "rotation_tp": rotation_tp,
      # Activation scales per token of o_proj/down_proj inputs (1: per
      # token; tp: one per shard, as the packed model on a mesh).
      "row_groups": row_groups,
      "rotation_objective": qconfig.rotation_objective if learned else None,
      "rotation_steps": qconfig.rotation_steps if learned else None,
      "rotation_batch_size": (qconfig.rotation_batch_size
                              if learned
                              and qconfig.rotation_objective == "e2e"
                              else None),
      "rotation_lr": qconfig.rotation_lr if learned else None,
      "learn_scales": qconfig.learn_scales if learned else None,
      "scale_lr_ratio": (qconfig.scale_lr_ratio
                         if learned and qconfig.learn_scales else None),
      "rotation_loss": (qconfig.rotation_loss if learned
                        and qconfig.rotation_objective == "e2e" else None),
      "rotation_s": None if rotation_s is None else round(rotation_s, 1),
      "rotation_loaded": rotation_loaded if learned else None,
      "rotation_calib_texts": (list(rotation_calib_texts)
                               if learned and rotation_calib_texts
                               else None),
      "a_clip": qconfig.a_clip, "kv_clip": qconfig.kv_clip,
      "center_keys": qconfig.center_keys,
      "ppl": result["ppl"], "fp_ppl": fp_ppl,
      "delta_ppl": result["ppl"] - fp_ppl,
      "eval_text": eval_text, "eval_windows": result["windows"],
      "eval_tokens": result["tokens"], "seqlen": seqlen,
      "nsamples": nsamples if qconfig.needs_calibration else 0,
      "wall_s": round(wall_s, 1),
      "date": datetime.date.today().isoformat(), "command": command,
      # Perplexities agree across devices to float rounding (SmolLM2 float:
      # 18.502197 on an H200 and on a CPU), but say where each ran.
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
  }


def run_sweep(params: Any, config: Any, configs: Sequence[QuaRotConfig],
              eval_windows: np.ndarray | Mapping[str, np.ndarray], *,
              calib_windows: np.ndarray | None = None,
              eval_text: str | None = None, model_name: str = "",
              command: str = "",
              on_record: Callable[[dict[str, Any]], None] | None = None,
              batch_size: int = 4, progress: bool = True,
              rotations_dir: str | None = None,
              rotation_tp: Sequence[int] = (1,),
              rotation_calib_windows: np.ndarray | None = None,
              rotation_calib_texts: Sequence[str] | None = None
              ) -> list[dict]:
  """Quantizes each config once (per `rotation_tp`) and evaluates it on
  each text.

  The float baseline runs first.

  Args:
    params: float params of the model.
    config: its `LlamaConfig`.
    configs: what to run; an all-16-bit unrotated config gives fp_ppl, and
      one is run first if absent.
    eval_windows: int32[n, seqlen] evaluation windows of `eval_text`, or
      {text name: int32[n_text, seqlen_text] windows} (`text_windows`) to
      score every quantized model on each text in turn.
    calib_windows: int32[m, seqlen] calibration windows (GPTQ configs and
      learned rotations; configs with the same `quarot.rotation_key` learn
      once and share the rotations).
    eval_text: name of the text of an array `eval_windows` (default
      enwiki-gensim), stored in each record; None with a mapping, whose
      keys name the texts.
    model_name: stored in each record.
    command: the command line that produced the run, stored in each record.
    on_record: called with each record as soon as it is scored (a long
      sweep can append it to a file).
    batch_size: windows per forward.
    progress: show progress bars.
    rotations_dir: load learned rotations saved here instead of learning
      them, and save the ones learned (`rotation_cache`); None learns every
      key and saves nothing.
    rotation_tp: tensor-parallel degrees: each rotated config runs once per
      degree, its online Hadamards block-diagonal with that many blocks
      (`quarot.quantize(..., rotation_tp=tp)`; 1: full width). A degree the
      model cannot take (`rotation_tp_problem`), and any degree but 1 for
      learned rotations, is skipped with one printed line saying why.
      Unrotated configs run once.
    rotation_calib_windows: int32[r, seqlen] windows the learned rotations
      learn on instead of `calib_windows` (GPTQ still calibrates on
      `calib_windows`, so only the rotation differs from a Hadamard row).
    rotation_calib_texts: the texts `rotation_calib_windows` come from,
      stored in the learned configs' records as `rotation_calib_texts`
      (None there: they learned on `calib_windows`).

  Returns:
    One record per (config, tp, text), config-major in the order run, then
    tp in the order given, texts in the order given: its label (' tpN'
    appended for tp N > 1), bits, method, rotation, `rotation_tp` (1 for
    the full-width transform and for unrotated configs; learned ones with
    `rotation_objective`, `rotation_steps`, `rotation_lr`,
    `rotation_batch_size` (e2e), `rotation_s`, the seconds spent learning
    them, and `rotation_loaded`, true when they
    came from `rotations_dir`), `eval_text`, `ppl`, and `fp_ppl` and
    `delta_ppl` against the float model on the same text, window counts,
    `wall_s` (quantizing, learning included, plus this text's evaluation;
    the quantization is shared by a config's records), date and command.

  Raises:
    ValueError: `eval_text` given with a mapping, an empty mapping, a
      saved rotation that does not fit (`rotation_cache.load`),
      `rotation_tp` not distinct positive ints, or `rotation_calib_texts`
      without `rotation_calib_windows`.
  """
  if rotation_calib_texts and rotation_calib_windows is None:
    raise ValueError(f"{rotation_calib_texts=} names the texts of"
                     " rotation_calib_windows, which is not given")
  if rotation_calib_windows is None:
    rotation_calib_windows = calib_windows
  if isinstance(eval_windows, Mapping):
    if eval_text is not None:
      raise ValueError(f"{eval_text=} must be None when eval_windows maps"
                       f" texts to windows ({list(eval_windows)})")
    texts = dict(eval_windows)
    if not texts:
      raise ValueError("eval_windows maps no evaluation text")
  else:
    texts = {eval_text or data.EVAL_TEXT_NAME: eval_windows}
  fp_config = QuaRotConfig(rotate=False, **_FP)
  configs = list(configs)
  if fp_config in configs:
    configs.remove(fp_config)
  configs.insert(0, fp_config)
  runs = _runs(params, config, configs, rotation_tp)
  nsamples = 0 if calib_windows is None else calib_windows.shape[0]
  records = []
  fp_ppl = {}  # text -> float model's perplexity
  learned = {}  # rotation_key -> (rotations, seconds learning, loaded)
  for qconfig, tp in runs:
    start = time.time()
    key = quarot.rotation_key(qconfig)
    if key is not None and key not in learned:
      learned[key] = rotation_cache.learn_or_load(
          params, config, qconfig, rotation_calib_windows,
          directory=rotations_dir,
          model_name=model_name, progress=progress)
    rotations, rotation_s, loaded = learned.get(key, (None, None, None))
    qparams, options = quarot.quantize(params, config, qconfig,
                                       calib_windows, rotations=rotations,
                                       rotation_tp=tp, progress=progress)
    quantize_s = time.time() - start
    for text, windows_ in texts.items():
      eval_start = time.time()
      result = evaluate.perplexity(qparams, config, windows_,
                                   options=options, batch_size=batch_size,
                                   progress=progress)
      fp_ppl.setdefault(text, result["ppl"])
      record = _record(
          qconfig, result, fp_ppl[text],
          wall_s=quantize_s + time.time() - eval_start,
          seqlen=windows_.shape[1], nsamples=nsamples, eval_text=text,
          model_name=model_name, command=command, rotation_s=rotation_s,
          rotation_loaded=loaded, rotation_tp=tp,
          row_groups=options.row_groups,
          rotation_calib_texts=rotation_calib_texts)
      records.append(record)
      if progress:
        print(f"{record['label']:<32} {text:<14} ppl {record['ppl']:.3f}"
              f" ({record['delta_ppl']:+.3f})  {record['wall_s']} s",
              flush=True)
      if on_record is not None:
        on_record(record)
  return records


def learn_rotations(params: Any, config: Any,
                    configs: Sequence[QuaRotConfig],
                    calib_windows: np.ndarray, *, rotations_dir: str,
                    model_name: str = "", progress: bool = True,
                    time_budget_s: float | None = None,
                    started: float | None = None
                    ) -> list[dict[str, Any]]:
  """Learns (or finds) the rotations of `configs` in `rotations_dir`.

  The first half of a sweep split over two processes: a later `run_sweep`
  with the same `rotations_dir`, model and calibration windows loads them.

  Args:
    params: float params of the model.
    config: its `LlamaConfig`.
    configs: the sweep's configs; those learning no rotations are skipped,
      configs sharing a `quarot.rotation_key` learn once.
    calib_windows: int32[m, seqlen] calibration windows.
    rotations_dir: where the rotations are saved.
    model_name: the model's name (part of what identifies a rotation).
    progress: show progress bars.
    time_budget_s: seconds of learning for all the configs together; when
      spent, learning pauses with its state saved beside its entry
      (`rotation_cache.learn_or_load`) and the same call resumes it.
    started: the `time.time()` the budget counts from (default: now). A
      command bounded by a wall-clock limit passes its own start, so the
      time it spent loading the model counts too.

  Returns:
    One row per key, in the order of `configs`: `label` (its first
    config), `path` (the saved entry), `rotation_s` and `rotation_loaded`.

  Raises:
    ValueError: no config learns rotations, or a saved one does not fit.
    learned_rotation.LearningPaused: the time budget was spent.
  """
  if started is None:
    started = time.time()
  deadline = None if time_budget_s is None else started + time_budget_s
  rows, seen = [], set()
  for qconfig in configs:
    key = quarot.rotation_key(qconfig)
    if key is None or key in seen:
      continue
    seen.add(key)
    _, rotation_s, loaded = rotation_cache.learn_or_load(
        params, config, qconfig, calib_windows, directory=rotations_dir,
        model_name=model_name, progress=progress,
        time_budget_s=(None if deadline is None
                       else max(0.0, deadline - time.time())))
    rows.append({"label": qconfig.describe(),
                 "path": rotation_cache.path_for(
                     rotations_dir, qconfig, model_name=model_name,
                     calib_windows=calib_windows),
                 "rotation_s": round(rotation_s, 1),
                 "rotation_loaded": loaded})
  if not rows:
    raise ValueError(
        f"none of {[c.describe() for c in configs]} learns rotations"
        " (rotate_mode='learned')")
  return rows
