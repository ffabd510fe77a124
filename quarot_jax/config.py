"""Model configuration for the LLaMA family, built from a Hugging Face config.

`LlamaConfig` keeps Hugging Face's field names so that no rename layer is
needed. It covers Llama-2, Llama-3/3.1/3.2 (`rope_scaling` of type llama3),
Mistral (sliding window ignored), Qwen2 (q/k/v bias), TinyLlama and SmolLM
(tied embeddings), and GQA. Anything else raises a `ValueError` naming the
field.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA-family decoder.

  Frozen and hashable, so it can be a static argument of `jax.jit`.
  `rope_scaling` is stored as a sorted tuple of (key, value) pairs for the
  same reason; `rope_scaling_dict` gives it back as a dict.
  """

  model_type: str = "llama"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type={self.model_type!r} is not supported; expected one of"
          f" {SUPPORTED_MODEL_TYPES}"
      )
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple"
          f" of num_key_value_heads={self.num_key_value_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      kind = scaling.get("rope_type", scaling.get("type"))
      if kind not in ("llama3", "default"):
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; only 'llama3'"
        )

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    """`rope_scaling` as a plain dict, or None."""
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def num_groups(self) -> int:
    """G = query heads per KV head."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """EOS ids as a tuple (HF allows an int or a list)."""
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> "LlamaConfig":
    """Builds a config from an HF `config.json` dict.

    Args:
      hf_config: the parsed `config.json` of a LLaMA-family checkpoint.

    Returns:
      The matching `LlamaConfig`.

    Raises:
      ValueError: the architecture or one of its options is not supported;
        the message names the field.
    """
    c = dict(hf_config)
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"config field model_type={model_type!r} is not supported; expected"
          f" one of {SUPPORTED_MODEL_TYPES}"
      )
    for field in ("vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads"):
      if field not in c:
        raise ValueError(f"config field {field!r} is missing")
    if c.get("hidden_act", "silu") != "silu":
      raise ValueError(
          f"config field hidden_act={c['hidden_act']!r} is not supported;"
          " only 'silu'"
      )
    if c.get("mlp_bias", False):
      raise ValueError("config field mlp_bias=True is not supported")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rope_theta = c.get("rope_theta")
    rope_scaling = c.get("rope_scaling")
    # transformers 5 may nest theta and scaling in `rope_parameters`.
    rope_params = c.get("rope_parameters")
    if isinstance(rope_params, Mapping):
      rope_theta = rope_params.get("rope_theta", rope_theta)
      if rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items()
                        if k != "rope_theta"}
    if rope_scaling is not None:
      kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
      if kind == "default":
        rope_scaling = None
      elif kind != "llama3":
        raise ValueError(
            f"config field rope_scaling of type {kind!r} is not supported;"
            " only 'llama3'"
        )
      else:
        rope_scaling = tuple(sorted(
            (k, v) for k, v in rope_scaling.items()
            if k in ("rope_type", "factor", "low_freq_factor",
                     "high_freq_factor", "original_max_position_embeddings")
        ))
    eos = c.get("eos_token_id")
    if isinstance(eos, list):
      eos = tuple(eos)
    return cls(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", model_type == "qwen2")),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=eos,
    )

  @classmethod
  def from_json_file(cls, path: str | os.PathLike[str]) -> "LlamaConfig":
    """Reads `config.json` at `path` and calls `from_hf`."""
    if not os.path.isfile(path):
      raise ValueError(f"no config file at {os.fspath(path)!r}")
    with open(path) as f:
      return cls.from_hf(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serializable dict that `from_dict` reads back."""
    d = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      d["rope_scaling"] = [list(kv) for kv in self.rope_scaling]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    """Inverse of `to_dict`."""
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
      d["eos_token_id"] = tuple(d["eos_token_id"])
    return cls(**d)
