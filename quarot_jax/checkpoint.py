"""Saving and restoring params as Orbax checkpoints, and `load` for any source.

A checkpoint directory holds:
  quarot_meta.json   format_version, the `LlamaConfig`, and the quantization
                     config (None for a float model)
  params/            an Orbax `StandardCheckpointer` checkpoint of the params
  tokenizer/         (optional) the model's HF tokenizer

The metadata also lists the SHA-256 of every other file (`checksums`), and
loading verifies them, so a flipped byte fails loudly instead of giving NaN
logits. SHA-256 ran at 0.8-1.1 GiB/s on one core of a 2-core AMD EPYC
(SHA-NI, a 256 MiB buffer, a busy machine), so a 7B checkpoint in bf16
(12.6 GiB) would add about 11-16 s to a load and an f32 one twice that: an
extrapolation from that rate, not a 7B measurement. `verify=False` skips it.

Everything is written into a temporary sibling directory and renamed into
place at the end (`atomic`), so a failure never leaves a half-written
checkpoint, and what a killed save left is removed by the next one.
"""

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from quarot_jax import atomic
from quarot_jax import data
from quarot_jax import gguf
from quarot_jax import hf
from quarot_jax import model
from quarot_jax import qlinear
from quarot_jax import quarot
from quarot_jax.config import LlamaConfig

FORMAT_VERSION = 1
META_FILE = "quarot_meta.json"


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer()


def _orbax_record(record) -> bool:
  """False for a log record made by Orbax (the filter drops it)."""
  return f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_orbax() -> None:
  """Drops Orbax's absl log records, once and for good.

  Orbax logs ~30 INFO lines per save, and after a failure (a full disk) a
  traceback per background thread at ERROR, some after the save returned;
  the same error reaches the caller as the exception, so nothing is lost.
  """
  import logging  # pylint: disable=g-import-not-at-top
  logger = logging.getLogger("absl")
  if _orbax_record not in logger.filters:
    logger.addFilter(_orbax_record)


def _drop_closed_loop_noise() -> None:
  """Keeps Orbax's writer threads from printing tracebacks after a failure.

  When a save fails (a full disk), TensorStore callbacks still running in
  Orbax's threads hit the closed asyncio loop and report "Event loop is
  closed" as unraisable errors, a traceback each. The failure itself
  reaches the caller as the exception, so only these are dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "quarot_jax_filter", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == (
        "Event loop is closed"):
      return
    previous(unraisable)
  hook.quarot_jax_filter = True
  sys.unraisablehook = hook


def is_checkpoint(path: str) -> bool:
  """True if `path` is a directory written by `save_params`."""
  return os.path.isfile(os.path.join(path, META_FILE))


def save_params(params: Any, path: str, config: LlamaConfig, *,
                quantization: dict | None = None, tokenizer: Any = None,
                overwrite: bool = False) -> str:
  """Writes params and metadata to `path` atomically.

  Args:
    params: the params pytree (numpy or jax leaves), or Flax variables
      `{"params": params}` (the params are stored).
    path: the checkpoint directory to create.
    config: the model config, stored in the metadata.
    quantization: a JSON-serializable description of how the params were
      rotated/quantized (None for a float model).
    tokenizer: an HF tokenizer to store beside the params (optional).
    overwrite: replace an existing non-empty `path`.

  Returns:
    The absolute path written.

  Raises:
    ValueError: `path` is a file, cannot be written, or exists and is not
      empty while `overwrite` is False.
    OSError: the disk filled up (errno ENOSPC; nothing is left behind).
  """
  params, _ = model.unwrap(params)
  path = atomic.check_out_dir(path, overwrite=overwrite)
  tmp = atomic.make_temp_dir(path)
  _quiet_orbax()
  _drop_closed_loop_noise()
  try:
    ckptr = _checkpointer()
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(),
            "quantization": quantization,
            "checksums": atomic.file_checksums(tmp)}
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    atomic.commit(tmp, path)
  except BaseException as e:
    atomic.clean_stale(path)
    if isinstance(e, Exception) and atomic.is_disk_full(e):
      raise atomic.disk_full_error(path) from None
    raise
  return path


def read_meta(path: str) -> dict:
  """The metadata dict of a checkpoint written by `save_params`.

  Raises:
    ValueError: `path` is not a checkpoint, or its metadata is unreadable
      or of another format version.
  """
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise ValueError(f"{path!r} is not a quarot_jax checkpoint (no {META_FILE})")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{meta_path!r} is unreadable ({e})") from None
  if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
    version = meta.get("format_version") if isinstance(meta, dict) else None
    raise ValueError(
        f"{path!r} has format_version={version!r}; this"
        f" version of quarot_jax reads {FORMAT_VERSION}")
  return meta


def _quantized_label(quantization: dict) -> str:
  label = quarot.QuaRotConfig(**quantization["qconfig"]).describe()
  return label + (", packed int4" if quantization.get("packed") else "")


def _restore(path: str, meta: dict, like: Any, verify: bool) -> Any:
  """The params of checkpoint `path` (checksums verified first)."""
  if verify and meta.get("checksums"):
    atomic.verify_checksums(path, meta["checksums"])
  _quiet_orbax()
  ckptr = _checkpointer()
  if like is None:
    return ckptr.restore(os.path.join(path, "params"))
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
  return ckptr.restore(os.path.join(path, "params"), target)


def load_params(path: str, *, like: Any = None,
                verify: bool = True) -> tuple[Any, LlamaConfig]:
  """Restores a float checkpoint written by `save_params`.

  Args:
    path: the checkpoint directory.
    like: an optional pytree (arrays or `jax.ShapeDtypeStruct`s) giving the
      structure, shapes and dtypes to restore into.
    verify: check each file's SHA-256 against the metadata first (reads
      the checkpoint once more; about 1 GiB/s on one CPU core).

  Returns:
    (params, config).

  Raises:
    ValueError: not a checkpoint, a corrupt file, or a quantized checkpoint
      (its params only run with their options: use `load_quantized`).
  """
  path = os.path.abspath(path)
  meta = read_meta(path)
  quantization = meta.get("quantization")
  if quantization and "qconfig" in quantization:
    raise ValueError(
        f"{path!r} holds a quantized model ({_quantized_label(quantization)})"
        " whose params only run with their run options; load it with"
        " quarot_jax.checkpoint.load_quantized(path), which returns"
        " (params, config, qconfig, options)")
  config = LlamaConfig.from_dict(meta["config"])
  return _restore(path, meta, like, verify), config


def save_quantized(params: Any, path: str, config: LlamaConfig, qconfig: Any,
                   *, tokenizer: Any = None, overwrite: bool = False) -> str:
  """`save_params` for params from `quarot.quantize`, recording `qconfig`.

  Args:
    params: quantized params (packed int4 or simulated).
    path: the checkpoint directory to create.
    config: the model config.
    qconfig: the `quarot.QuaRotConfig` the params were made with.
    tokenizer: an HF tokenizer to store too (optional).
    overwrite: replace a non-empty `path`.

  Returns:
    The absolute path written.
  """
  params, _ = model.unwrap(params)
  quantization = {"qconfig": dataclasses.asdict(qconfig),
                  "packed": qlinear.is_packed(params)}
  return save_params(params, path, config, quantization=quantization,
                     tokenizer=tokenizer, overwrite=overwrite)


def _check_same(path: str, what: str, stored: Any, expected: Any) -> None:
  """Raises ValueError naming every field where two dataclasses differ."""
  if expected is None:
    return
  diffs = [f"{f.name}: checkpoint {getattr(stored, f.name)!r}, expected"
           f" {getattr(expected, f.name)!r}"
           for f in dataclasses.fields(expected)
           if getattr(stored, f.name) != getattr(expected, f.name)]
  if diffs:
    raise ValueError(f"{path!r} was saved with a different {what}: "
                     + "; ".join(diffs))


def load_quantized(path: str, *, expected: Any = None,
                   expected_config: LlamaConfig | None = None,
                   verify: bool = True
                   ) -> tuple[Any, LlamaConfig, Any, Any]:
  """Restores a checkpoint written by `save_quantized`.

  Args:
    path: the checkpoint directory.
    expected: a `quarot.QuaRotConfig` the caller wants; loading fails if the
      stored one differs.
    expected_config: a `LlamaConfig` the caller wants, checked likewise.
    verify: check each file's SHA-256 first (see `load_params`).

  Returns:
    (params, config, qconfig, options): run `forward(params, ...,
    options=options)` or `generate(..., options=options)`.

  Raises:
    ValueError: not a quantized checkpoint, a corrupt file, or stored
      configs differ from the expected ones (the message names each
      differing field).
  """
  meta = read_meta(os.path.abspath(path))
  quantization = meta.get("quantization")
  if not quantization or "qconfig" not in quantization:
    raise ValueError(f"{path!r} holds a float model, not a quantized one;"
                     " use quarot_jax.load, or quantize it first")
  qconfig = quarot.QuaRotConfig(**quantization["qconfig"])
  config = LlamaConfig.from_dict(meta["config"])
  _check_same(path, "quantization config", qconfig, expected)
  _check_same(path, "model config", config, expected_config)
  params = _restore(os.path.abspath(path), meta, None, verify)
  return params, config, qconfig, qconfig.run_options(config.head_dim)


def load(path: str, *, dtype: Any = np.float32,
         allow_pickle: bool = False) -> tuple[Any, LlamaConfig]:
  """Loads a float model from an Orbax checkpoint, an HF directory or a GGUF.

  A quantized checkpoint is refused: its params need the run options it
  was saved with, which `checkpoint.load_quantized` returns with them.

  Args:
    path: a directory written by `save_params`, a Hugging Face checkpoint
      directory (config.json + safetensors), or a `.gguf` file.
    dtype: param dtype for HF and GGUF sources (checkpoints keep theirs).
    allow_pickle: allow HF `.bin` weights.

  Returns:
    (params, config).

  Raises:
    ValueError: `path` does not exist, is none of the above, is a quantized
      checkpoint, or is corrupt.
  """
  if not os.path.exists(path):
    raise ValueError(f"no such file or directory: {path!r}")
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise ValueError(f"{path!r} is a file but not a .gguf file; give a"
                       " .gguf file, an HF directory or a checkpoint")
    return gguf.load_gguf(path, dtype=dtype)
  if is_checkpoint(path):
    return load_params(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return hf.load_hf(path, dtype=dtype, allow_pickle=allow_pickle)
  raise ValueError(
      f"{path!r} is not a quarot_jax checkpoint, an HF directory with"
      " config.json, or a .gguf file")


def load_tokenizer(path: str) -> Any:
  """The HF tokenizer stored with a checkpoint, HF directory or GGUF file.

  Raises:
    ValueError: no tokenizer is stored at `path`.
  """
  if os.path.isfile(path) and path.endswith(".gguf"):
    return gguf.load_gguf_tokenizer(path)
  import transformers  # pylint: disable=g-import-not-at-top
  for candidate in (os.path.join(path, "tokenizer"), path):
    if (os.path.isfile(os.path.join(candidate, "tokenizer.json"))
        or os.path.isfile(os.path.join(candidate, "tokenizer_config.json"))):
      return transformers.AutoTokenizer.from_pretrained(candidate)
  raise ValueError(f"no tokenizer stored at {path!r}")


def _cast_floats(params: Any, dtype: Any) -> Any:
  """Casts float leaves to `dtype`, except the int4 weights' scales and
  zero points (f32)."""
  def cast(path, a):
    a = np.asarray(a)
    if (np.issubdtype(a.dtype, np.floating)
        and getattr(path[-1], "key", None) not in ("wscale", "wzero")):
      return a.astype(dtype)
    return a
  return jax.tree_util.tree_map_with_path(cast, params)


def convert(source: str, out_dir: str, *, dtype: str = "float32",
            overwrite: bool = False, allow_pickle: bool = False,
            qconfig: Any = None, calib_windows: int = 128,
            calib_seqlen: int = 2048, progress: bool = True) -> str:
  """Loads `source` (HF dir or .gguf) and saves it, with its tokenizer.

  Args:
    source: an HF checkpoint directory or a `.gguf` file.
    out_dir: the checkpoint directory to write.
    dtype: 'float32' or 'bfloat16' (of the float leaves).
    overwrite: replace a non-empty `out_dir`.
    allow_pickle: allow HF `.bin` weights.
    qconfig: a `quarot.QuaRotConfig`: rotate and quantize to packed int4
      (`quarot.quantize(..., packed=True)`) before saving; None keeps float.
    calib_windows: GPTQ calibration windows of enwiki-gensim.
    calib_seqlen: tokens per calibration window.
    progress: progress bars while quantizing.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    ValueError: bad or quantized source, unsupported model, bad dtype, an
      `out_dir` that cannot be written, is or contains `source`, or is not
      empty without `overwrite` (all checked before any work).
    OSError: the disk filled up while saving (nothing is left behind).
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
  if dtype not in dtypes:
    raise ValueError(f"{dtype=} must be one of {sorted(dtypes)}")
  if not os.path.exists(source):
    raise ValueError(f"no such file or directory: {source!r}")
  if is_checkpoint(source):
    quantization = read_meta(source).get("quantization")
    if quantization and "qconfig" in quantization:
      raise ValueError(
          f"{source!r} is already a quantized checkpoint"
          f" ({_quantized_label(quantization)}); convert reads float"
          " models: an HF directory, a .gguf file or a float checkpoint")
  out_dir = atomic.check_out_dir(out_dir, overwrite=overwrite, source=source,
                                 what="out_dir")
  if qconfig is not None:
    quarot.check_packable(qconfig)
  params, config = load(source, dtype=np.float32 if qconfig else dtypes[dtype],
                        allow_pickle=allow_pickle)
  try:
    tokenizer = load_tokenizer(source)
  except ValueError:
    tokenizer = None  # a weights-only source: the checkpoint has none either
  if qconfig is None:
    return save_params(params, out_dir, config, tokenizer=tokenizer,
                       overwrite=overwrite)
  calib = None
  if qconfig.needs_calibration:
    if tokenizer is None:
      raise ValueError(f"GPTQ, learned rotations and center_keys need"
                       f" calibration text, but {source!r} has no tokenizer;"
                       " use w_method='rtn' and the Hadamard without"
                       " center_keys")
    calib = data.calibration_windows(tokenizer, nsamples=calib_windows,
                                     seqlen=calib_seqlen)
  params, _ = quarot.quantize(params, config, qconfig, calib, packed=True,
                              progress=progress)
  params = _cast_floats(params, dtypes[dtype])
  return save_quantized(params, out_dir, config, qconfig,
                        tokenizer=tokenizer, overwrite=overwrite)
