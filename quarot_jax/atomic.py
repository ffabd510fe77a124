"""Directories written all at once, checked before any work, and checksummed.

A writer (`checkpoint.save_params`) calls `check_out_dir` before it does
anything expensive, builds the directory under `make_temp_dir` (a hidden
sibling named `.<name>.tmp-<pid>-<hex>`), and `commit`s it: one rename, or
two when it replaces an existing directory. A run killed half way leaves a
temp sibling behind; the next `check_out_dir` for the same target removes
it (and puts back the old directory if the kill fell between the two
renames), so nothing is left behind for long and nothing is lost.

`file_checksums` / `verify_checksums` store and check the SHA-256 of every
file (the same digests `sha256sum` prints).
"""

import errno
import hashlib
import os
import secrets
import shutil
from typing import Iterable

_TMP = ".tmp-"
_OLD = ".old"
# Errors that mean "the disk is full", whatever layer reports them.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def _prefix(path: str) -> str:
  return f".{os.path.basename(path)}{_TMP}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  return True


def clean_stale(path: str) -> list[str]:
  """Removes the temp siblings that killed writes of `path` left behind.

  Temp directories of a live process (another write in progress) are kept.
  If `path` is missing and a stale `.old` copy exists (a kill between the
  two renames of a replacement), the old directory is put back instead.

  Args:
    path: the absolute target directory.

  Returns:
    The names removed or restored.
  """
  parent, prefix = os.path.dirname(path), _prefix(path)
  try:
    names = sorted(os.listdir(parent))
  except OSError:
    return []
  done = []
  for name in names:
    if not name.startswith(prefix):
      continue
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit() or (int(pid) != os.getpid()
                             and _pid_alive(int(pid))):
      continue
    full = os.path.join(parent, name)
    if name.endswith(_OLD) and not os.path.exists(path):
      os.rename(full, path)
    else:
      shutil.rmtree(full, ignore_errors=True)
    done.append(name)
  return done


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_out_dir(path: str, *, overwrite: bool = False,
                  source: str | None = None, what: str = "out_dir") -> str:
  """Checks that `path` can be written, before any expensive work.

  Also removes what killed earlier writes of `path` left (`clean_stale`).

  Args:
    path: the directory to be written.
    overwrite: a non-empty `path` may be replaced.
    source: the file or directory the output is made from; `path` may not
      be it or contain it (replacing `path` would delete the source).
    what: how the message names `path` (e.g. '--out_dir').

  Returns:
    The absolute `path`.

  Raises:
    ValueError: `path` is a file, is not empty (without `overwrite`), is or
      contains `source`, or its parent cannot be written.
  """
  path = os.path.abspath(path)
  if source is not None:
    real_out = os.path.realpath(path)
    real_src = os.path.realpath(source)
    if real_src == real_out or real_src.startswith(real_out + os.sep):
      raise ValueError(
          f"{what} {path!r} is or contains the source {source!r}; writing"
          " there would delete it. Choose another output directory")
  existing = _nearest_existing(path)
  if not os.path.isdir(existing):
    raise ValueError(f"{what} {path!r}: {existing!r} is a file, not a"
                     " directory")
  if existing == path and os.listdir(path) and not overwrite:
    raise ValueError(f"{what} {path!r} exists and is not empty; pass"
                     " overwrite=True (--overwrite) to replace it")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.rmdir(make_temp_dir(path))
  except OSError as e:
    raise ValueError(f"{what} {path!r} cannot be written: {e.strerror or e}"
                     f" (in {os.path.dirname(path)!r})") from None
  clean_stale(path)
  return path


def make_temp_dir(path: str) -> str:
  """Creates the hidden temp sibling of `path` (mode from the umask)."""
  parent = os.path.dirname(path)
  tmp = os.path.join(parent,
                     f"{_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # 0777 & ~umask, unlike tempfile.mkdtemp's 0700
  return tmp


def commit(tmp: str, path: str) -> None:
  """Moves the finished `tmp` to `path`, replacing what is there."""
  if os.path.exists(path):
    old = tmp + _OLD
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)


def is_disk_full(error: BaseException) -> bool:
  """True if `error` (or one it was raised from) says the disk is full."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, "errno", None) in _DISK_FULL:
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def disk_full_error(path: str) -> OSError:
  """The one-line error for a write of `path` that ran out of disk."""
  parent = os.path.dirname(os.path.abspath(path))
  try:
    free = f"{shutil.disk_usage(parent).free / 2**20:.0f} MiB free"
  except OSError:
    free = "free space unknown"
  return OSError(errno.ENOSPC, f"no space left on the device of {parent!r}"
                 f" ({free}); {path!r} was not written")


def file_sha256(path: str) -> str:
  """The hex SHA-256 of a file's bytes, read in 16 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def _files(root: str, skip: Iterable[str]) -> list[str]:
  skip = set(skip)
  out = []
  for dirpath, _, names in os.walk(root):
    for name in names:
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      if rel not in skip:
        out.append(rel)
  return sorted(out)


def file_checksums(root: str, *, skip: Iterable[str] = ()) -> dict[str, str]:
  """SHA-256 of every file under `root` (relative path -> hex digest)."""
  return {rel: file_sha256(os.path.join(root, rel))
          for rel in _files(root, skip)}


def verify_checksums(root: str, checksums: dict[str, str]) -> None:
  """Recomputes each file's SHA-256 and compares it to `checksums`.

  Raises:
    ValueError: a listed file is missing or its content changed.
  """
  for rel, want in sorted(checksums.items()):
    full = os.path.join(root, rel)
    if not os.path.isfile(full):
      raise ValueError(f"{root!r} is incomplete: {rel!r} is missing")
    got = file_sha256(full)
    if got != want:
      raise ValueError(
          f"{root!r} is corrupt: {rel!r} has sha256 {got[:16]}…, saved as"
          f" {want[:16]}…; write the checkpoint again")
