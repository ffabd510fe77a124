"""Orbax round trip and the convert CLI's error handling."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from quarot_jax import checkpoint
from quarot_jax import hf
from quarot_jax import model
from tests import hf_models

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hf_to_orbax_round_trip_gives_identical_logits(tmp_path):
  path, _ = hf_models.tiny_hf_model("qwen2")
  out = checkpoint.convert(path, str(tmp_path / "ckpt"))
  params, config = hf.load_hf(path)
  restored, restored_config = checkpoint.load(out)
  assert restored_config == config
  tokens = hf_models.random_tokens(config.vocab_size, 2, 8)
  want, _ = model.forward(params, tokens, config)
  got, _ = model.forward(restored, tokens, restored_config)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_into_like(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  out = checkpoint.save_params(params, str(tmp_path / "c"), config)
  restored, _ = checkpoint.load_params(out, like=params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refuses_non_empty_out_dir_and_leaves_it_alone(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  out = tmp_path / "busy"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="not empty"):
    checkpoint.convert(path, str(out))
  assert os.listdir(out) == ["keep.txt"]
  checkpoint.convert(path, str(out), overwrite=True)
  assert checkpoint.is_checkpoint(str(out))
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_refuses_pickle_without_flag(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  src = tmp_path / "bin"
  src.mkdir()
  (src / "config.json").write_text(open(os.path.join(path,
                                                     "config.json")).read())
  params, _ = hf.load_hf(path)
  torch.save({"model.norm.weight": torch.from_numpy(params["norm"]["scale"])},
             src / "pytorch_model.bin")
  with pytest.raises(ValueError, match="allow_pickle"):
    hf.load_hf(str(src))
  # With the flag it reads the file, then names what is missing.
  with pytest.raises(ValueError, match="missing tensors"):
    hf.load_hf(str(src), allow_pickle=True)


def test_shape_mismatch_and_unsupported_arch(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["intermediate_size"] = 100
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="has shape"):
    hf.load_hf(str(bad))
  cfg["model_type"] = "gpt2"
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    hf.load_hf(str(bad))


def _float_ckpt(tmp_path, name="ck"):
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  return params, config, checkpoint.save_params(params, str(tmp_path / name),
                                                config)


def _quantized_meta_ckpt(tmp_path):
  """A checkpoint whose metadata says W4A4KV4 (params left float: cheap)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from quarot_jax import quarot  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  qconfig = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)
  quantization = {"qconfig": dataclasses.asdict(qconfig), "packed": True}
  return checkpoint.save_params(params, str(tmp_path / "q"), config,
                                quantization=quantization)


def test_load_refuses_a_quantized_checkpoint(tmp_path):
  q = _quantized_meta_ckpt(tmp_path)
  for load in (checkpoint.load, checkpoint.load_params):
    with pytest.raises(ValueError, match=r"W4A4KV4 rtn rot-hadamard, packed"
                       r" int4.*checkpoint\.load_quantized\(path\)"):
      load(q)
  with pytest.raises(ValueError, match="already a quantized checkpoint"):
    checkpoint.convert(q, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_checksum_catches_a_flipped_byte(tmp_path):
  _, _, out = _float_ckpt(tmp_path)
  files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
  biggest = max(files, key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(biggest, "wb").write(bytes(data))
  with pytest.raises(ValueError, match=r"is corrupt: .* has sha256"):
    checkpoint.load(out)


def test_checkpoint_dirs_follow_the_umask(tmp_path):
  import stat  # pylint: disable=g-import-not-at-top
  old = os.umask(0o022)
  try:
    _, _, out = _float_ckpt(tmp_path)
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_out_dir_is_checked_before_any_work(tmp_path, monkeypatch):
  path, _ = hf_models.tiny_hf_model("llama2")
  def no_work(*args, **kwargs):
    raise AssertionError("loaded the model before checking --out_dir")
  monkeypatch.setattr(checkpoint, "load", no_work)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    checkpoint.convert(path, str(tmp_path / "file"))
  def read_only(target):
    raise OSError(13, "Permission denied", os.path.dirname(target))
  monkeypatch.setattr(checkpoint.atomic, "make_temp_dir", read_only)
  with pytest.raises(ValueError, match="cannot be written: Permission"):
    checkpoint.convert(path, str(tmp_path / "ro" / "out"))


def test_overwrite_never_deletes_the_source(tmp_path):
  _, _, src = _float_ckpt(tmp_path)
  with pytest.raises(ValueError, match="is or contains the source"):
    checkpoint.convert(src, src, overwrite=True)
  with pytest.raises(ValueError, match="is or contains the source"):
    checkpoint.convert(src, str(tmp_path), overwrite=True)
  assert checkpoint.load(src)[1].num_hidden_layers == 2


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  class FullDisk:
    def save(self, directory, params):
      os.makedirs(directory)
      open(os.path.join(directory, "part"), "w").write("x")
      raise ValueError("Error writing \"d/1234\": [OS error: No space left"
                       " on device]\nsource location ...")
  monkeypatch.setattr(checkpoint, "_checkpointer", FullDisk)
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama2")[0])
  with pytest.raises(OSError, match="no space left") as info:
    checkpoint.save_params(params, str(tmp_path / "ck"), config)
  assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
  assert os.listdir(tmp_path) == []


def test_truncated_safetensors_names_the_file(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  shard = bad / "model.safetensors"
  shard.write_bytes(shard.read_bytes()[:-1000])
  with pytest.raises(ValueError, match=r"model\.safetensors' is not a"
                     r" readable safetensors file"):
    hf.load_hf(str(bad))


def test_missing_source_says_no_such_file(tmp_path):
  with pytest.raises(ValueError, match="no such file or directory"):
    checkpoint.load(str(tmp_path / "model.gguf"))
  with pytest.raises(ValueError, match="no such file or directory"):
    checkpoint.convert(str(tmp_path / "model.gguf"), str(tmp_path / "o"))


_KILLED_SAVE = """
import sys, time
from quarot_jax import checkpoint, hf
params, config = hf.load_hf(sys.argv[1])
orbax = checkpoint._checkpointer
class Hang:  # the params are on disk, the rename not yet done
  def __init__(self):
    self.ckptr = orbax()
  def save(self, *args):
    self.ckptr.save(*args)
  def wait_until_finished(self):
    self.ckptr.wait_until_finished()
    print("ready", flush=True)
    time.sleep(600)
checkpoint._checkpointer = Hang
checkpoint.save_params(params, sys.argv[2], config)
"""


def test_kill_9_during_save_leaves_nothing_after_the_next_run(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model("llama2")
  out = tmp_path / "ck"
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, path, str(out)],
                          cwd=_ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  left = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  assert left and not out.exists()  # what a kill -9 leaves behind
  params, config = hf.load_hf(path)
  checkpoint.save_params(params, str(out), config)
  assert os.listdir(tmp_path) == ["ck"]
  assert checkpoint.load(str(out))[1] == config


def test_cli_errors_are_one_line_and_name_the_flag(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  (tmp_path / "file").write_text("x")
  cases = [
      ([f"--hf_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"],
       "no such file or directory"),
      ([f"--gguf={tmp_path / 'missing.gguf'}", f"--out_dir={tmp_path / 'o'}"],
       "no such file or directory"),
      ([f"--hf_dir={path}", f"--out_dir={tmp_path / 'file'}"],
       "is a file, not a directory"),
      ([f"--hf_dir={path}", f"--out_dir={tmp_path / 'o'}", "--quantize",
        "--w_bits=8"], r"--w_bits=8 \(needs 4\)"),
  ]
  for args, match in cases:
    proc = subprocess.run(
        [sys.executable, "-m", "convert.hf_to_orbax", *args], cwd=_ROOT,
        capture_output=True, text=True, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert re.search(match, lines[0]) and "packed=False" not in lines[0]
  assert os.listdir(tmp_path) == ["file"]


def test_cli_success_prints_no_log_lines(tmp_path):
  path, _ = hf_models.tiny_hf_model("llama2")
  proc = subprocess.run(
      [sys.executable, "-m", "convert.hf_to_orbax", f"--hf_dir={path}",
       f"--out_dir={tmp_path / 'ck'}"], cwd=_ROOT, capture_output=True,
      text=True, check=True)
  assert proc.stdout.strip() == f"wrote {tmp_path / 'ck'}"
  assert not re.search(r"^[IW]\d{4} ", proc.stderr, re.M), proc.stderr


def test_orbax_log_records_are_dropped(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  buf = io.StringIO()
  handler = logging.StreamHandler(buf)
  logger = logging.getLogger("absl")
  old = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  logger.addHandler(handler)
  try:
    _, _, out = _float_ckpt(tmp_path)  # Orbax logs ~30 INFO lines per save
    checkpoint.load(out)
    logger.info("not from Orbax")
  finally:
    logger.removeHandler(handler)
    absl_logging.set_verbosity(old)
  assert buf.getvalue().splitlines() == ["not from Orbax"]
