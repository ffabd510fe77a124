"""Accuracy sweeps: quantize a model many ways and tabulate perplexity.

Library side of `experiments/accuracy.py`: the CLI only turns flags into a
list of `QuaRotConfig`s and calls `run_sweep`.
"""

import datetime
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from quarot_jax import evaluate
from quarot_jax import quarot
from quarot_jax.quarot import QuaRotConfig

_FP = dict(w_bits=16, a_bits=16, k_bits=16, v_bits=16)


def group_size_for(config: Any, preferred: int = 128) -> int:
  """The largest power of two <= `preferred` dividing every linear input.

  QuaRot's "128G" mode assumes widths that are multiples of 128; SmolLM2's
  hidden size 576 is not, so it gets 64.
  """
  widths = (config.hidden_size, config.intermediate_size,
            config.num_attention_heads * config.head_dim)
  g = preferred
  while g > 1 and any(w % g for w in widths):
    g //= 2
  return g


def paper_sweep(group_size: int = 128) -> list[QuaRotConfig]:
  """The table of the accuracy issue, each config with and without rotation.

  fp; W8A8KV8; W6A6KV6; W4A16 (RTN, GPTQ); W4A4KV4 (RTN, GPTQ, GPTQ with
  weight groups of `group_size`); KV-only 4/3/2 bits.
  """
  base = [
      dict(w_bits=8, a_bits=8, k_bits=8, v_bits=8),
      dict(w_bits=6, a_bits=6, k_bits=6, v_bits=6),
      dict(w_bits=4, a_bits=16, w_method="rtn"),
      dict(w_bits=4, a_bits=16, w_method="gptq"),
      dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn"),
      dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq"),
      dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq",
           w_groupsize=group_size),
      dict(k_bits=4, v_bits=4),
      dict(k_bits=3, v_bits=3),
      dict(k_bits=2, v_bits=2),
  ]
  configs = [QuaRotConfig(rotate=False)]
  for kw in base:
    for rotate in (False, True):
      configs.append(QuaRotConfig(rotate=rotate, **kw))
  return configs


def _record(qconfig: QuaRotConfig, result: dict, fp_ppl: float, *,
            wall_s: float, seqlen: int, nsamples: int, eval_text: str,
            model_name: str, command: str) -> dict[str, Any]:
  return {
      "model": model_name,
      "label": qconfig.describe(),
      "w_bits": qconfig.w_bits, "a_bits": qconfig.a_bits,
      "k_bits": qconfig.k_bits, "v_bits": qconfig.v_bits,
      "w_method": qconfig.w_method if qconfig.w_bits < 16 else "none",
      "groupsize": qconfig.w_groupsize,
      "rotate": qconfig.rotate, "rotate_mode": qconfig.rotate_mode,
      "a_clip": qconfig.a_clip, "kv_clip": qconfig.kv_clip,
      "ppl": result["ppl"], "fp_ppl": fp_ppl,
      "delta_ppl": result["ppl"] - fp_ppl,
      "eval_text": eval_text, "eval_windows": result["windows"],
      "eval_tokens": result["tokens"], "seqlen": seqlen,
      "nsamples": nsamples if qconfig.w_method == "gptq" else 0,
      "wall_s": round(wall_s, 1),
      "date": datetime.date.today().isoformat(), "command": command,
  }


def markdown_table(records: Sequence[dict]) -> str:
  """One row per record: bits, method, rotation, ppl, Δ vs fp, wall time."""
  lines = ["| config | W | A | K | V | method | group | rotation | ppl |"
           " Δ vs fp | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(
        f"| {r['label']} | {r['w_bits']} | {r['a_bits']} | {r['k_bits']} |"
        f" {r['v_bits']} | {r['w_method']} | {r['groupsize'] or '-'} |"
        f" {r['rotate_mode'] if r['rotate'] else 'none'} |"
        f" {r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {r['wall_s']} |")
  return "\n".join(lines) + "\n"


CSV_COLUMNS = ("label", "w_bits", "a_bits", "k_bits", "v_bits", "w_method",
               "groupsize", "rotate", "rotate_mode", "ppl", "fp_ppl",
               "delta_ppl", "eval_windows", "eval_tokens", "wall_s")


def write_csv(path: str, records: Sequence[dict]) -> None:
  """The same table as CSV (one row per record, `CSV_COLUMNS`)."""
  import csv  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)


def _append_jsonl(path: str, records: Sequence[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def run_sweep(params: Any, config: Any, configs: Sequence[QuaRotConfig],
              eval_windows: np.ndarray, *,
              calib_windows: np.ndarray | None = None,
              eval_text: str, model_name: str, command: str,
              out_jsonl: str | None = None, out_md: str | None = None,
              batch_size: int = 4, progress: bool = True) -> list[dict]:
  """Quantizes and evaluates each config; writes JSONL and Markdown.

  Args:
    params: float params of the model.
    config: its `LlamaConfig`.
    configs: what to run; an all-16-bit unrotated config gives fp_ppl, and
      one is run first if absent.
    eval_windows: int32[n, seqlen] evaluation windows.
    calib_windows: int32[m, seqlen] calibration windows (GPTQ configs).
    eval_text: name of the evaluation corpus, stored in each record.
    model_name: stored in each record.
    command: the command line that produced the run, stored in each record.
    out_jsonl: append one record per config here (written as each finishes).
    out_md: write the Markdown table here at the end, and the same table
      as CSV beside it (`.csv`).
    batch_size: windows per forward.
    progress: show progress bars.

  Returns:
    The records.
  """
  fp_config = QuaRotConfig(rotate=False, **_FP)
  configs = list(configs)
  if fp_config in configs:
    configs.remove(fp_config)
  configs.insert(0, fp_config)
  seqlen = eval_windows.shape[1]
  nsamples = 0 if calib_windows is None else calib_windows.shape[0]
  records = []
  fp_ppl = None
  for qconfig in configs:
    start = time.time()
    qparams, options = quarot.quantize(params, config, qconfig,
                                       calib_windows, progress=progress)
    result = evaluate.perplexity(qparams, config, eval_windows,
                                 options=options, batch_size=batch_size,
                                 progress=progress)
    if fp_ppl is None:
      fp_ppl = result["ppl"]
    record = _record(qconfig, result, fp_ppl, wall_s=time.time() - start,
                     seqlen=seqlen, nsamples=nsamples, eval_text=eval_text,
                     model_name=model_name, command=command)
    records.append(record)
    print(f"{record['label']:<32} ppl {record['ppl']:.3f}"
          f" ({record['delta_ppl']:+.3f})  {record['wall_s']} s", flush=True)
    if out_jsonl:
      _append_jsonl(out_jsonl, [record])
  if out_md:
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w") as f:
      f.write(markdown_table(records))
    write_csv(os.path.splitext(out_md)[0] + ".csv", records)
  return records


def load_model(path: str | None) -> tuple[Any, Any, Any, str]:
  """Loads a model and its tokenizer; None means the embedded SmolLM2.

  Returns:
    (params, config, tokenizer, name).
  """
  from quarot_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
  if path is None:
    path = gguf.find_smollm2_gguf()
  params, config = checkpoint.load(path)
  tokenizer = checkpoint.load_tokenizer(path)
  return params, config, tokenizer, os.path.basename(os.path.normpath(path))


def load_windows(tokenizer: Any, *, seqlen: int, max_windows: int | None,
                 nsamples: int) -> tuple[np.ndarray, np.ndarray | None]:
  """enwiki-gensim evaluation windows and (if nsamples) calibration ones."""
  from quarot_jax import data  # pylint: disable=g-import-not-at-top
  evals = data.eval_windows(tokenizer, seqlen=seqlen, max_windows=max_windows)
  calib = (data.calibration_windows(tokenizer, nsamples=nsamples,
                                    seqlen=seqlen) if nsamples else None)
  return evals, calib


def hf_reference_perplexity(path: str, windows: np.ndarray, *,
                            progress: bool = True) -> dict[str, float]:
  """Perplexity of `windows` under `transformers`' own model (torch, CPU).

  The independent reference for our float forward: the same file loaded by
  `AutoModelForCausalLM` (GGUF or HF directory), scored window by window.

  Args:
    path: a `.gguf` file or an HF checkpoint directory.
    windows: int32[n, seqlen].
    progress: show a progress bar.

  Returns:
    {'ppl', 'nll', 'windows', 'tokens'} as `evaluate.perplexity`.
  """
  import math  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if path.endswith(".gguf"):
    kwargs["gguf_file"] = os.path.basename(path)
    path = os.path.dirname(os.path.abspath(path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, **kwargs)
  hf_model.eval()
  total = 0.0
  with torch.no_grad():
    for row in tqdm.tqdm(windows, desc="hf reference", disable=not progress):
      ids = torch.from_numpy(np.asarray(row[None], np.int64))
      total += hf_model(ids, labels=ids).loss.item() * (len(row) - 1)
  count = windows.shape[0] * (windows.shape[1] - 1)
  return {"ppl": math.exp(total / count), "nll": total / count,
          "windows": windows.shape[0], "tokens": count}


def latest_records(path: str) -> list[dict]:
  """Records of a JSONL results file, the latest one per config label.

  Rows follow the order in which labels first appear.
  """
  latest: dict[str, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        latest[record["label"]] = record
  return list(latest.values())


def table_from_jsonl(path: str) -> str:
  """The Markdown table of a results file, one row per config label."""
  return markdown_table(latest_records(path))
