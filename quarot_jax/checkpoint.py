"""Saving and restoring params as Orbax checkpoints, and `load` for any source.

A checkpoint directory holds:
  quarot_meta.json   format_version, the `LlamaConfig`, and the quantization
                     config (None for a float model)
  params/            an Orbax `StandardCheckpointer` checkpoint of the params
  tokenizer/         (optional) the model's HF tokenizer

Everything is written into a temporary sibling directory and renamed into
place at the end, so a failure never leaves a half-written checkpoint.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from quarot_jax import model
from quarot_jax.config import LlamaConfig

FORMAT_VERSION = 1
META_FILE = "quarot_meta.json"


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer()


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
    ValueError: `path` exists, is not empty, and `overwrite` is False.
  """
  params, _ = model.unwrap(params)
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise ValueError(
        f"{path!r} exists and is not empty; pass overwrite=True"
        " (--overwrite) to replace it")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-",
                         dir=parent)
  try:
    ckptr = _checkpointer()
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(),
            "quantization": quantization}
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(path):
      old = tmp + ".old"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def read_meta(path: str) -> dict:
  """The metadata dict of a checkpoint written by `save_params`."""
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise ValueError(f"{path!r} is not a quarot_jax checkpoint (no {META_FILE})")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{path!r} has format_version={meta.get('format_version')!r}; this"
        f" version of quarot_jax reads {FORMAT_VERSION}")
  return meta


def load_params(path: str, *, like: Any = None) -> tuple[Any, LlamaConfig,
                                                         dict | None]:
  """Restores a checkpoint written by `save_params`.

  Args:
    path: the checkpoint directory.
    like: an optional pytree (arrays or `jax.ShapeDtypeStruct`s) giving the
      structure, shapes and dtypes to restore into.

  Returns:
    (params, config, quantization metadata or None).
  """
  path = os.path.abspath(path)
  meta = read_meta(path)
  config = LlamaConfig.from_dict(meta["config"])
  ckptr = _checkpointer()
  if like is None:
    params = ckptr.restore(os.path.join(path, "params"))
  else:
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
    params = ckptr.restore(os.path.join(path, "params"), target)
  return params, config, meta.get("quantization")


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
  from quarot_jax import qlinear  # pylint: disable=g-import-not-at-top
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
                   expected_config: LlamaConfig | None = None
                   ) -> tuple[Any, LlamaConfig, Any, Any]:
  """Restores a checkpoint written by `save_quantized`.

  Args:
    path: the checkpoint directory.
    expected: a `quarot.QuaRotConfig` the caller wants; loading fails if the
      stored one differs.
    expected_config: a `LlamaConfig` the caller wants, checked likewise.

  Returns:
    (params, config, qconfig, options): run `forward(params, ...,
    options=options)` or `generate(..., options=options)`.

  Raises:
    ValueError: not a quantized checkpoint, or stored configs differ from
      the expected ones (the message names each differing field).
  """
  from quarot_jax import quarot  # pylint: disable=g-import-not-at-top
  meta = read_meta(os.path.abspath(path))
  quantization = meta.get("quantization")
  if not quantization or "qconfig" not in quantization:
    raise ValueError(f"{path!r} holds a float model, not a quantized one;"
                     " use load_params, or quantize it first")
  qconfig = quarot.QuaRotConfig(**quantization["qconfig"])
  config = LlamaConfig.from_dict(meta["config"])
  _check_same(path, "quantization config", qconfig, expected)
  _check_same(path, "model config", config, expected_config)
  params, config, _ = load_params(path)
  return params, config, qconfig, qconfig.run_options(config.head_dim)


def load(path: str, *, dtype: Any = np.float32,
         allow_pickle: bool = False) -> tuple[Any, LlamaConfig]:
  """Loads a model from an Orbax checkpoint, an HF directory or a GGUF file.

  Args:
    path: a directory written by `save_params`, a Hugging Face checkpoint
      directory (config.json + safetensors), or a `.gguf` file.
    dtype: param dtype for HF and GGUF sources (checkpoints keep theirs).
    allow_pickle: allow HF `.bin` weights.

  Returns:
    (params, config).

  Raises:
    ValueError: `path` is none of the above.
  """
  if os.path.isfile(path) and path.endswith(".gguf"):
    from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load_gguf(path, dtype=dtype)
  if is_checkpoint(path):
    params, config, _ = load_params(path)
    return params, config
  if os.path.isfile(os.path.join(path, "config.json")):
    from quarot_jax import hf  # pylint: disable=g-import-not-at-top
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
    from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load_gguf_tokenizer(path)
  import transformers  # pylint: disable=g-import-not-at-top
  for candidate in (os.path.join(path, "tokenizer"), path):
    if (os.path.isfile(os.path.join(candidate, "tokenizer.json"))
        or os.path.isfile(os.path.join(candidate, "tokenizer_config.json"))):
      return transformers.AutoTokenizer.from_pretrained(candidate)
  raise ValueError(f"no tokenizer stored at {path!r}")


def _cast_floats(params: Any, dtype: Any) -> Any:
  """Casts float leaves to `dtype`, except the int4 weight scales (f32)."""
  def cast(path, a):
    a = np.asarray(a)
    if (np.issubdtype(a.dtype, np.floating)
        and getattr(path[-1], "key", None) != "wscale"):
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
    ValueError: bad source, unsupported model, bad dtype, or a non-empty
      `out_dir` without `overwrite`.
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
  if dtype not in dtypes:
    raise ValueError(f"{dtype=} must be one of {sorted(dtypes)}")
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"--out_dir {out_dir!r} is not empty; pass --overwrite")
  if qconfig is not None:
    from quarot_jax import quarot  # pylint: disable=g-import-not-at-top
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
  if qconfig.w_method == "gptq":
    if tokenizer is None:
      raise ValueError(f"GPTQ needs calibration text, but {source!r} has no"
                       " tokenizer; use w_method='rtn'")
    from quarot_jax import data  # pylint: disable=g-import-not-at-top
    calib = data.calibration_windows(tokenizer, nsamples=calib_windows,
                                     seqlen=calib_seqlen)
  params, _ = quarot.quantize(params, config, qconfig, calib, packed=True,
                              progress=progress)
  params = _cast_floats(params, dtypes[dtype])
  return save_quantized(params, out_dir, config, qconfig,
                        tokenizer=tokenizer, overwrite=overwrite)
