"""Markdown and CSV tables of accuracy-sweep records, and reading them back.

A record is a dict from `quarot_jax.sweep.run_sweep`; records are appended
to JSON Lines files by `benchmarking.append_jsonl`.
"""

import csv
import json
import os
from typing import Any, Sequence


def markdown_table(records: Sequence[dict]) -> str:
  """One row per record: text, bits, method, rotation, ppl, Δ vs fp, wall s,
  eval windows and device ('-' for records that predate the field).

  Δ vs fp is against the float model on the row's text.
  """
  lines = ["| config | text | W | A | K | V | method | group | rotation |"
           " ppl | Δ vs fp | wall s | windows | device |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(
        f"| {r['label']} | {r.get('eval_text') or '-'} | {r['w_bits']} |"
        f" {r['a_bits']} | {r['k_bits']} |"
        f" {r['v_bits']} | {r['w_method']} | {r['groupsize'] or '-'} |"
        f" {r['rotate_mode'] if r['rotate'] else 'none'} |"
        f" {r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {r['wall_s']} |"
        f" {r.get('eval_windows') or '-'} | {r.get('device') or '-'} |")
  return "\n".join(lines) + "\n"


CSV_COLUMNS = ("label", "eval_text", "w_bits", "a_bits", "k_bits", "v_bits",
               "w_method", "groupsize", "rotate", "rotate_mode", "ppl",
               "fp_ppl", "delta_ppl", "eval_windows", "eval_tokens", "wall_s")


def write_csv(path: str, records: Sequence[dict]) -> None:
  """The same table as CSV (one row per record, `CSV_COLUMNS`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)


def write_tables(out_md: str, records: Sequence[dict]) -> None:
  """Writes the Markdown table to `out_md` and the CSV beside it (`.csv`)."""
  os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
  with open(out_md, "w") as f:
    f.write(markdown_table(records))
  write_csv(os.path.splitext(out_md)[0] + ".csv", records)


def latest_records(path: str) -> list[dict]:
  """Records of a JSONL results file, the latest per (label, eval_text,
  eval_windows): a short check on a few windows is another figure, not a
  newer one.

  Rows follow the order in which those keys first appear.
  """
  latest: dict[tuple[str, str | None, int | None], dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        latest[record["label"], record.get("eval_text"),
               record.get("eval_windows")] = record
  return list(latest.values())


def table_from_jsonl(path: str) -> str:
  """The Markdown table of a results file, one row per `latest_records`
  key."""
  return markdown_table(latest_records(path))
