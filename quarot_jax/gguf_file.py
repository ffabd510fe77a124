"""A GGUF file's header (metadata and tensor table), parsed fast.

The `gguf` package's `GGUFReader` builds a numpy view for every part of
every metadata value; for Qwen2.5-1.5B's 152K-token vocabulary and 151K
merges that is ~12-24 s on a 2-core CPU, paid on every load. This parser
reads the same header with `struct` over a memory map (~1 s) and gives the
same values: scalars as Python numbers, strings as `str`, arrays of numbers
as numpy arrays, arrays of strings as lists of `str`. Tensor data stays in
the file: `tensor_data` is a read-only memory-mapped view.

The layout (little-endian, versions 2 and 3): magic b'GGUF', u32 version,
u64 tensor count, u64 key-value count; each key-value is a string key, a
u32 value type and the value (an array: u32 element type, u64 count, the
elements); each tensor is a string name, u32 n_dims, n_dims u64 dims
(fastest first), u32 ggml type and a u64 offset into the data section,
which starts at the next multiple of `general.alignment` (default 32).
Strings are a u64 byte count and UTF-8 bytes.
"""

import dataclasses
import mmap
import struct
from typing import Any

import numpy as np

_ALIGNMENT_KEY = "general.alignment"
_DEFAULT_ALIGNMENT = 32

# GGUF value type -> (struct format, numpy dtype) for fixed-size values.
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16),
    3: ("<h", np.int16), 4: ("<I", np.uint32), 5: ("<i", np.int32),
    6: ("<f", np.float32), 7: ("<?", np.bool_), 10: ("<Q", np.uint64),
    11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of the tensor table.

  Attributes:
    name: e.g. 'blk.0.attn_q.weight'.
    shape: GGUF dims, fastest axis first ([cols, rows] for a matrix).
    tensor_type: its `gguf.GGMLQuantizationType`.
    offset: absolute byte offset of its data in the file.
    n_bytes: bytes of its data.
  """

  name: str
  shape: tuple[int, ...]
  tensor_type: Any
  offset: int
  n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  """What a GGUF file says about itself.

  Attributes:
    path: the file.
    version: GGUF version (2 or 3).
    fields: metadata key -> value (see the module docstring for types).
    tensors: the tensor table, in file order.
    data_offset: where the data section starts (everything before it is
      the header).
  """

  path: str
  version: int
  fields: dict[str, Any]
  tensors: tuple[TensorInfo, ...]
  data_offset: int


class _Truncated(Exception):
  """The header runs past the end of the file (`read_header` words it)."""


class _Cursor:
  """Reads GGUF values from a buffer, raising _Truncated past its end."""

  def __init__(self, buf: Any, size: int):
    self.buf, self.size, self.pos = buf, size, 0

  def take(self, fmt: str) -> Any:
    n = struct.calcsize(fmt)
    if self.pos + n > self.size:
      raise _Truncated(f"the header runs past the end of the file at byte"
                       f" {self.pos}")
    value = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += n
    return value

  def string(self) -> str:
    n = self.take("<Q")
    if self.pos + n > self.size:
      raise _Truncated(f"a string of {n} bytes at byte {self.pos} runs past"
                       " the end of the file")
    value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
    self.pos += n
    return value

  def value(self, value_type: int) -> Any:
    if value_type == _STRING:
      return self.string()
    if value_type == _ARRAY:
      return self.array()
    if value_type not in _SCALARS:
      raise ValueError(f"unknown GGUF value type {value_type} at byte"
                       f" {self.pos}")
    return self.take(_SCALARS[value_type][0])

  def array(self) -> Any:
    elem_type, count = self.take("<I"), self.take("<Q")
    if elem_type == _STRING:
      return [self.string() for _ in range(count)]
    if elem_type == _ARRAY:
      return [self.array() for _ in range(count)]
    if elem_type not in _SCALARS:
      raise ValueError(f"unknown GGUF array element type {elem_type}")
    dtype = np.dtype(_SCALARS[elem_type][1]).newbyteorder("<")
    end = self.pos + count * dtype.itemsize
    if end > self.size:
      raise _Truncated(f"an array of {count} values at byte {self.pos} runs"
                       " past the end of the file")
    values = np.frombuffer(self.buf, dtype, count, self.pos).copy()
    self.pos = end
    return values


def read_header(path: str) -> GGUFHeader:
  """Parses the header of the GGUF file at `path`.

  Raises:
    ValueError: not a GGUF file, a version other than 2 or 3 (or a
      big-endian file), an unknown value or tensor type, or a header or
      tensor that runs past the end of the file (truncated).
  """
  import gguf  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    magic = f.read(4)
    if magic != b"GGUF":
      raise ValueError(f"{path!r} is not a GGUF file (it starts with"
                       f" {magic!r}, not b'GGUF')")
    size = f.seek(0, 2)
    if size < 24:
      raise ValueError(f"{path!r} ({size} bytes) is too short for a GGUF"
                       " header")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      cur = _Cursor(buf, size)
      cur.pos = 4
      try:
        version = cur.take("<I")
        if version not in (2, 3):
          raise ValueError(f"{path!r}: GGUF version {version} is not 2 or 3"
                           " (a big-endian file reads as a huge version)")
        n_tensors, n_fields = cur.take("<Q"), cur.take("<Q")
        fields = {}
        for _ in range(n_fields):
          key = cur.string()
          fields[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
          name = cur.string()
          dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
          type_id, offset = cur.take("<I"), cur.take("<Q")
          infos.append((name, dims, type_id, offset))
      except _Truncated as e:
        raise ValueError(f"{path!r} ({size} bytes) is truncated: {e}"
                         ) from None
      header_end = cur.pos
  alignment = int(fields.get(_ALIGNMENT_KEY, _DEFAULT_ALIGNMENT))
  data_offset = -(-header_end // alignment) * alignment
  tensors = []
  for name, dims, type_id, offset in infos:
    try:
      tensor_type = gguf.GGMLQuantizationType(type_id)
    except ValueError:
      raise ValueError(f"{path!r}: tensor {name!r} has unknown ggml type"
                       f" {type_id}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
    start = data_offset + offset
    if start + n_bytes > size:
      raise ValueError(f"{path!r} is truncated: tensor {name!r} needs bytes"
                       f" up to {start + n_bytes}, the file has {size}")
    tensors.append(TensorInfo(name=name, shape=dims, tensor_type=tensor_type,
                              offset=start, n_bytes=n_bytes))
  return GGUFHeader(path=path, version=version, fields=fields,
                    tensors=tuple(tensors), data_offset=data_offset)


def tensor_data(header: GGUFHeader, tensor: TensorInfo) -> np.ndarray:
  """The raw bytes of `tensor` as read-only uint8[rows, bytes per row].

  A memory-mapped view: nothing is read until it is used. Rows are the
  GGUF dims past the first (the torch layout's leading axes).
  """
  import gguf  # pylint: disable=g-import-not-at-top
  block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
  row_bytes = tensor.shape[0] // block * type_size
  data = np.memmap(header.path, np.uint8, mode="r", offset=tensor.offset,
                   shape=(tensor.n_bytes,))
  return data.reshape(-1, row_bytes)
