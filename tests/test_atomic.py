"""Atomic directory writes: checks before work, stale temp folders, hashes."""

import errno
import os
import stat
import subprocess
import sys

import pytest

from quarot_jax import atomic


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_out_dir_that_is_a_file(tmp_path):
  target = tmp_path / "f"
  target.write_text("x")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    atomic.check_out_dir(str(target))
  with pytest.raises(ValueError, match="is a file, not a directory"):
    atomic.check_out_dir(str(target / "sub"))


def test_non_empty_needs_overwrite(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep").write_text("x")
  with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
    atomic.check_out_dir(str(tmp_path / "out"))
  assert atomic.check_out_dir(str(tmp_path / "out"), overwrite=True) == str(
      tmp_path / "out")


@pytest.mark.parametrize("out, source", [("m", "m"), ("m", "m/hf"),
                                         ("m", "m/a/x.gguf")])
def test_refuses_out_dir_that_is_or_contains_the_source(tmp_path, out,
                                                         source):
  (tmp_path / "m" / "a").mkdir(parents=True)
  with pytest.raises(ValueError, match="is or contains the source"):
    atomic.check_out_dir(str(tmp_path / out), overwrite=True,
                         source=str(tmp_path / source))
  # An output inside the source folder deletes nothing: allowed.
  atomic.check_out_dir(str(tmp_path / "m" / "ckpt"), source=str(
      tmp_path / "m"))


def test_unwritable_parent_is_one_line(tmp_path, monkeypatch):
  def read_only(path):
    raise OSError(errno.EROFS, "Read-only file system", os.path.dirname(path))
  monkeypatch.setattr(atomic, "make_temp_dir", read_only)
  with pytest.raises(ValueError,
                     match=r"cannot be written: Read-only file system"):
    atomic.check_out_dir(str(tmp_path / "out"))


def test_cleans_stale_temp_dirs_of_dead_processes_only(tmp_path):
  path = str(tmp_path / "ck")
  dead, alive = _dead_pid(), os.getppid()
  (tmp_path / f".ck.tmp-{dead}-0a0b").mkdir()
  (tmp_path / f".ck.tmp-{dead}-0a0b" / "big").write_text("x" * 100)
  (tmp_path / f".ck.tmp-{alive}-0c0d").mkdir()  # a save in progress
  (tmp_path / ".other.tmp-1-0e0f").mkdir()  # not ours to touch
  atomic.check_out_dir(path)
  assert sorted(os.listdir(tmp_path)) == sorted(
      [f".ck.tmp-{alive}-0c0d", ".other.tmp-1-0e0f"])


def test_a_kill_between_the_renames_restores_the_old_dir(tmp_path):
  dead = _dead_pid()
  old = tmp_path / f".ck.tmp-{dead}-0a0b.old"
  old.mkdir()
  (old / "weights").write_text("old model")
  (tmp_path / f".ck.tmp-{dead}-0a0b").mkdir()  # the unfinished new one
  atomic.check_out_dir(str(tmp_path / "ck"), overwrite=True)
  assert os.listdir(tmp_path) == ["ck"]
  assert (tmp_path / "ck" / "weights").read_text() == "old model"


def test_temp_dir_follows_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    tmp = atomic.make_temp_dir(str(tmp_path / "ck"))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o755


def test_checksums_catch_a_flipped_byte(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a").write_bytes(bytes(range(256)) * 8)
  (tmp_path / "b").write_bytes(b"hello")
  sums = atomic.file_checksums(str(tmp_path))
  assert sorted(sums) == ["b", os.path.join("d", "a")]
  # The digest sha256sum prints for b"hello".
  assert sums["b"] == ("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e7304"
                       "3362938b9824")
  atomic.verify_checksums(str(tmp_path), sums)
  data = bytearray((tmp_path / "d" / "a").read_bytes())
  data[1000] ^= 0x01
  (tmp_path / "d" / "a").write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"is corrupt: 'd/a' has sha256"):
    atomic.verify_checksums(str(tmp_path), sums)
  os.remove(tmp_path / "b")
  with pytest.raises(ValueError, match="'b' is missing"):
    atomic.verify_checksums(str(tmp_path), {"b": sums["b"]})


def test_disk_full_detection():
  assert atomic.is_disk_full(OSError(errno.ENOSPC, "x"))
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise ValueError("tensorstore: write failed") from e
  except ValueError as wrapped:
    assert atomic.is_disk_full(wrapped)
  assert atomic.is_disk_full(ValueError("... [OS error: No space left on"
                                        " device] ..."))
  assert not atomic.is_disk_full(ValueError("bad shape"))
  error = atomic.disk_full_error("/tmp/x/ck")
  assert error.errno == errno.ENOSPC and "\n" not in str(error)
