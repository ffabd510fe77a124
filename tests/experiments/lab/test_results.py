"""Sweep tables: Markdown, CSV, and the latest record per label."""

import json

from experiments.lab import results

_BASE = dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn",
             groupsize=None, rotate=True, rotate_mode="hadamard",
             fp_ppl=9.0, delta_ppl=1.0, eval_windows=2, eval_tokens=30,
             wall_s=1, eval_text="enwiki-gensim")


def test_write_tables_writes_markdown_and_csv(tmp_path):
  records = [dict(_BASE, label="a", ppl=10.0),
             dict(_BASE, label="b", ppl=11.25, rotate=False,
                  eval_text="code-sympy")]
  md = tmp_path / "sub" / "r.md"
  results.write_tables(str(md), records)
  lines = md.read_text().splitlines()
  assert len(lines) == 4 and lines[0].startswith("| config | text |")
  assert lines[2].startswith("| a | enwiki-gensim |")
  assert "| hadamard |" in lines[2]
  assert lines[3].startswith("| b | code-sympy |") and "| none |" in lines[3]
  assert "11.250" in lines[3]
  assert all(l.count("|") == lines[0].count("|") for l in lines)
  csv_lines = (tmp_path / "sub" / "r.csv").read_text().splitlines()
  assert csv_lines[0] == ",".join(results.CSV_COLUMNS)
  assert csv_lines[2].startswith(
      "b,code-sympy,4,4,4,4,rtn,,False,hadamard,11.25,")


def test_table_keeps_the_latest_record_per_label(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(json.dumps(dict(_BASE, label=l, ppl=p))
                            for l, p in (("a", 10.0), ("b", 3.0),
                                         ("a", 12.5))) + "\n")
  assert [r["label"] for r in results.latest_records(str(path))] == ["a", "b"]
  table = results.table_from_jsonl(str(path))
  assert "12.500" in table and "10.000" not in table


def test_table_keeps_the_latest_record_per_label_and_text(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(
      json.dumps(dict(_BASE, label="a", eval_text=t, ppl=p))
      for t, p in (("enwiki-gensim", 10.0), ("code-sympy", 3.0),
                   ("enwiki-gensim", 12.5))) + "\n")
  assert [(r["eval_text"], r["ppl"])
          for r in results.latest_records(str(path))] == [
              ("enwiki-gensim", 12.5), ("code-sympy", 3.0)]


def test_latest_records_keep_other_window_counts_apart(tmp_path):
  # A 4-window CPU check must not stand in for the 32-window figure.
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(
      json.dumps(dict(_BASE, label="a", eval_windows=w, ppl=p))
      for w, p in ((32, 21.5), (4, 24.9), (32, 21.4))) + "\n")
  assert [(r["eval_windows"], r["ppl"])
          for r in results.latest_records(str(path))] == [(32, 21.4),
                                                         (4, 24.9)]


def test_markdown_table_names_windows_and_device():
  table = results.markdown_table([
      dict(_BASE, label="a", ppl=10.0, eval_windows=32, device="NVIDIA H100"),
      dict(_BASE, label="b", ppl=11.0)])  # older records have no device
  header, _, first, second = table.splitlines()
  assert "| windows |" in header and "| device |" in header
  assert "| 32 |" in first and "| NVIDIA H100 |" in first
  assert second.endswith("| 2 | - |")
