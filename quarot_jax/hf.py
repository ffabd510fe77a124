"""Reads Hugging Face LLaMA-family checkpoints into the params pytree.

Tensors are read one at a time from safetensors shards and written into
preallocated stacked arrays, so peak host memory is about one model copy.
Pickle `.bin` checkpoints are refused unless `allow_pickle=True`, and even then
are read with `torch.load(weights_only=True)`; no remote code ever runs.
"""

import glob
import os
import re
from typing import Any, Iterator

import numpy as np

from quarot_jax.config import LlamaConfig

# HF name (after `model.`) -> (path in our params, transpose?) for per-layer
# tensors; `{}` is the layer index.
_LAYER_TABLE = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), True),
    "self_attn.q_proj.bias": (("self_attn", "q_proj", "bias"), False),
    "self_attn.k_proj.bias": (("self_attn", "k_proj", "bias"), False),
    "self_attn.v_proj.bias": (("self_attn", "v_proj", "bias"), False),
    "self_attn.o_proj.bias": (("self_attn", "o_proj", "bias"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("input_layernorm", "scale"), False),
    "post_attention_layernorm.weight": (
        ("post_attention_layernorm", "scale"), False),
}
_GLOBAL_TABLE = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
    "model.norm.weight": (("norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some exporters save that the model recomputes.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def expected_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple]:
  """Shape of every param leaf (path tuple -> shape) for `config`."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  nh = config.num_attention_heads * config.head_dim
  kh = config.num_key_value_heads * config.head_dim
  per_layer = {
      ("self_attn", "q_proj", "kernel"): (d, nh),
      ("self_attn", "k_proj", "kernel"): (d, kh),
      ("self_attn", "v_proj", "kernel"): (d, kh),
      ("self_attn", "o_proj", "kernel"): (nh, d),
      ("self_attn", "q_proj", "bias"): (nh,),
      ("self_attn", "k_proj", "bias"): (kh,),
      ("self_attn", "v_proj", "bias"): (kh,),
      ("self_attn", "o_proj", "bias"): (d,),
      ("mlp", "gate_proj", "kernel"): (d, f),
      ("mlp", "up_proj", "kernel"): (d, f),
      ("mlp", "down_proj", "kernel"): (f, d),
      ("input_layernorm", "scale"): (d,),
      ("post_attention_layernorm", "scale"): (d,),
  }
  shapes = {("layers",) + k: (config.num_hidden_layers,) + s
            for k, s in per_layer.items()}
  shapes[("embed_tokens", "embedding")] = (v, d)
  shapes[("norm", "scale")] = (d,)
  shapes[("lm_head", "kernel")] = (d, v)
  return shapes


def _iter_tensors(hf_dir: str, allow_pickle: bool
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) one tensor at a time."""
  shards = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if shards:
    import safetensors  # pylint: disable=g-import-not-at-top
    for shard in shards:
      try:
        # The flax framework reads bf16 too (numpy's reader cannot).
        with safetensors.safe_open(shard, framework="flax") as f:
          names = list(f.keys())
          for name in names:
            tensor = np.asarray(f.get_tensor(name))
            yield name, tensor
      except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{shard!r} is not a readable safetensors file"
                         f" (truncated or corrupt?): {e}") from None
    return
  bins = sorted(glob.glob(os.path.join(hf_dir, "*.bin")))
  if not bins:
    raise ValueError(f"no *.safetensors or *.bin weights in {hf_dir!r}")
  if not allow_pickle:
    raise ValueError(
        f"{hf_dir!r} holds only pickle .bin weights; pass allow_pickle=True"
        " (--allow_pickle) to read them with torch.load(weights_only=True)")
  import torch  # pylint: disable=g-import-not-at-top
  for path in bins:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name in list(state):
      yield name, state.pop(name).float().numpy()


def load_hf(hf_dir: str, *, dtype: Any = np.float32,
            allow_pickle: bool = False) -> tuple[dict, LlamaConfig]:
  """Loads an HF checkpoint directory.

  Args:
    hf_dir: directory with `config.json` and safetensors shards.
    dtype: numpy dtype of the returned params (e.g. np.float32,
      ml_dtypes.bfloat16).
    allow_pickle: allow `.bin` checkpoints (read with weights_only=True).

  Returns:
    (params with numpy leaves, config).

  Raises:
    ValueError: missing files, unsupported config, unknown or missing
      tensors, or a tensor whose shape does not match the config.
  """
  if not os.path.isdir(hf_dir):
    raise ValueError(f"{hf_dir=} is not a directory")
  config = LlamaConfig.from_json_file(os.path.join(hf_dir, "config.json"))
  shapes = expected_shapes(config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for name, tensor in _iter_tensors(hf_dir, allow_pickle):
    if _IGNORED.search(name):
      continue
    match = _LAYER_RE.match(name)
    if match:
      layer, rest = int(match.group(1)), match.group(2)
      if rest not in _LAYER_TABLE or layer >= config.num_hidden_layers:
        raise ValueError(f"unexpected tensor {name!r} in {hf_dir!r}")
      sub, transpose = _LAYER_TABLE[rest]
      path = ("layers",) + sub
    elif name in _GLOBAL_TABLE:
      path, transpose = _GLOBAL_TABLE[name]
      layer = None
    else:
      raise ValueError(f"unexpected tensor {name!r} in {hf_dir!r}")
    value = tensor.T if transpose else tensor
    want = shapes[path][1:] if layer is not None else shapes[path]
    if value.shape != want:
      raise ValueError(
          f"tensor {name!r} has shape {tensor.shape}, expected"
          f" {want[::-1] if transpose else want} from config.json")
    if layer is None:
      flat[path] = value.astype(dtype)
    else:
      if path not in flat:
        flat[path] = np.zeros(shapes[path], dtype)
        flat[path + ("__seen__",)] = np.zeros(config.num_hidden_layers, bool)
      flat[path][layer] = value
      flat[path + ("__seen__",)][layer] = True
  params: dict = {}
  for path, value in flat.items():
    if path[-1] == "__seen__":
      if not value.all():
        raise ValueError(
            f"{'/'.join(path[:-1])} missing for layers"
            f" {np.flatnonzero(~value).tolist()} in {hf_dir!r}")
      continue
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  required = [p for p in shapes if p[-1] != "bias"
              and not (p[0] == "lm_head" and config.tie_word_embeddings)]
  missing = [p for p in required if p not in flat]
  if missing:
    raise ValueError(f"missing tensors {['/'.join(p) for p in missing]}"
                     f" in {hf_dir!r}")
  if config.tie_word_embeddings:
    params.pop("lm_head", None)
  return params, config
