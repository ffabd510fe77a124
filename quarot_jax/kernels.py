"""Which kernels the forward runs: decided once, from the platform and one
user setting.

`RunOptions` says *what* the model computes (rotations, quantizers);
`Kernels` says *how* the packed int4 linears, the activation quantizer and
the packed KV4 attention are run, and which attention prefill uses.
`resolve` is the only place that looks at the platform; every op below it
receives an already resolved choice and never re-derives it.

Settings (the notebook's `kernels=` argument and the CLIs' `--kernels`):

  auto       Pallas where it runs: on a Hopper GPU the Mosaic GPU W4A4
             matmul, elsewhere on a GPU the Triton one; cuDNN flash
             attention for prefill on an NVIDIA GPU; the plain-jnp/XLA
             references (einsum attention) on a CPU.
  mosaic     the Mosaic GPU W4A4 matmul (Hopper only); other ops Pallas,
             prefill attention cuDNN.
  triton     the Triton W4A4 matmul; other ops Pallas, prefill attention
             cuDNN.
  xla        every op as XLA code: int4 unpacked to int8 and XLA's int8 dot
             (cuBLAS on a GPU), jnp quantizers and attention.
  reference  same ops as 'xla' (the plain-jnp references are written as the
             fastest XLA formulation); kept as its own word so that tests
             and notebooks can say what they mean.
  interpret  every Pallas kernel that has an interpreter (Triton lowering)
             in interpret mode: how CI runs the kernels on a CPU.
"""

import dataclasses
import functools
import logging
from typing import Literal

import jax

from pallas_kernels import hadamard_quant as hq_lib

SETTINGS = ("auto", "mosaic", "triton", "xla", "reference", "interpret")

W4A4 = Literal["mosaic", "triton", "xla"]
PallasOrXla = Literal["pallas", "xla"]
Attention = Literal["cudnn", "xla"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kernels:
  """A resolved kernel choice; hashable, so a static jit argument.

  Attributes:
    w4a4: the int4 x int4 matmul: 'mosaic', 'triton' or 'xla'.
    w4a16: the int4-weight, float-activation matmul: 'pallas' or 'xla'.
    hadamard_quant: the fused online Hadamard + per-token quantizer.
    kv4_attention: decode attention over the packed KV4 cache.
    decode_attention: decode attention (T = 1) over a float cache:
      'pallas' is flash decoding (`pallas_kernels.decode_attention`), 'xla'
      the einsum `model.attend`.
    decode_matmul: the packed linears' matmul for at most
      `DECODE_ROWS` tokens (W4A4 and W4A16; `pallas_kernels.decode_matmul`,
      weights as the wgmma register operand): 'mosaic', 'triton' or 'xla'.
    attention: prefill attention (T > 1): 'cudnn' (flash attention through
      `jax.nn.dot_product_attention`, see `attention.py`; inputs cuDNN
      cannot take, such as f32, fall back to 'xla', logged) or 'xla'
      (`model.attend`, an einsum softmax over the [T, S] scores).
    rms_norm_quant: 'pallas' fuses the RMS pre-norm into the per-token
      quantizer of the packed q/k/v and gate/up inputs, at decode and
      prefill (`pallas_kernels.rms_norm_quant`, one launch instead of
      three), 'xla' normalizes first. 'pallas' in every GPU setting and
      'interpret'.
    prefill_qkv: 'pallas' runs a prefill's fused q/k/v output through
      `pallas_kernels.prefill_qkv` (RoPE, the head Hadamard, the KV4 cache
      write and the dequantized keys and values flash attention reads, in
      one launch) when the cache is packed; 'xla' runs those as separate
      ops. 'pallas' in every GPU setting and 'interpret': a 7B layer's
      prefill ran 1-2% faster with it at B = 1, 4, 16 (H200, BENCHMARKS.md).
    residual_in_matmul: o_proj's and down_proj's W4A4 prefill matmul
      adds the decoder's residual stream in its epilogue
      (`w4a4_matmul(..., residual=)`; no add pass of its own with
      'mosaic'); False adds it after, in XLA (the same numbers; a
      benchmark's A/B).
    swiglu_in_quant: a packed down_proj's prefill quantizer (the fused
      Hadamard + quantize kernel) reads the fused gate/up output and forms
      the SwiGLU as it loads each row (`hadamard_quant(..., gate_up=True)`),
      so the SwiGLU is no pass of its own; False runs it in XLA first (the
      same numbers; a benchmark's A/B).
    hadamard_config: launch parameters of `hadamard_quant` (a
      `pallas_kernels.hadamard_quant.HadamardQuantConfig`), None for its
      defaults; a benchmark's A/B of them in the whole layer.
    prefill_qkv_block_tokens: the most tokens a `prefill_qkv` program
      takes (its block is the largest power of two <= this dividing T:
      `prefill_qkv.default_block_tokens`), None for the kernel's default
      (64); a benchmark's A/B in the whole layer.
    prefill_qkv_half_rope: `prefill_qkv` reads only the first half of the
      rotary cos and sin (`rope_halves_equal`: the model's come from
      `layers.rope_cos_sin`, the H / 2 frequencies twice). On by default:
      a 7B layer's prefill at B = 1 took 1.2% and 1.9% less time with it
      in two runs (H100, 2026-12-07, BENCHMARKS.md); False is the A/B.
    interpret: run the Pallas kernels above in interpret mode.
    layer_loop: how `generate` runs the layers: 'unrolled' over per-layer
      weights and caches (`run_layout.unstack_layers`: each weight read once per
      step, as a GPU needs) or 'scan' over the stacked layout (compiles
      several times faster, which dominates short runs on a CPU).

  'pallas' for `hadamard_quant` and `kv4_attention` runs the kernel wherever
  the op's shape constraints allow (`kernel_takes` in its module: e.g. rows
  too short for the Hadamard split, head dims whose half is no power of
  two), and its reference elsewhere: a property of the shape, not a second
  look at the platform.
  """

  w4a4: W4A4 = "xla"
  w4a16: PallasOrXla = "xla"
  hadamard_quant: PallasOrXla = "xla"
  kv4_attention: PallasOrXla = "xla"
  decode_attention: PallasOrXla = "xla"
  decode_matmul: W4A4 = "xla"
  attention: Attention = "xla"
  rms_norm_quant: PallasOrXla = "xla"
  prefill_qkv: PallasOrXla = "xla"
  residual_in_matmul: bool = True
  swiglu_in_quant: bool = True
  hadamard_config: hq_lib.HadamardQuantConfig | None = None
  prefill_qkv_block_tokens: int | None = None
  prefill_qkv_half_rope: bool = True
  interpret: bool = False
  layer_loop: Literal["unrolled", "scan"] = "scan"

  def __post_init__(self):
    for name in ("w4a4", "decode_matmul"):
      value = getattr(self, name)
      if value not in ("mosaic", "triton", "xla"):
        raise ValueError(f"{name}={value!r} must be 'mosaic', 'triton' or"
                         " 'xla'")
    for name in ("w4a16", "hadamard_quant", "kv4_attention",
                 "decode_attention", "rms_norm_quant", "prefill_qkv"):
      value = getattr(self, name)
      if value not in ("pallas", "xla"):
        raise ValueError(f"{name}={value!r} must be 'pallas' or 'xla'")
    if self.attention not in ("cudnn", "xla"):
      raise ValueError(f"attention={self.attention!r} must be 'cudnn' or"
                       " 'xla'")
    if self.layer_loop not in ("unrolled", "scan"):
      raise ValueError(f"layer_loop={self.layer_loop!r} must be 'unrolled'"
                       " or 'scan'")
    bt = self.prefill_qkv_block_tokens
    if bt is not None and (not isinstance(bt, int) or bt < 16
                           or bt & (bt - 1)):
      raise ValueError(f"prefill_qkv_block_tokens={bt!r} must be None or a"
                       " power of two >= 16")
    if self.interpret and "mosaic" in (self.w4a4, self.decode_matmul):
      raise ValueError("'mosaic' kernels have no interpret mode; use"
                       " 'triton'")


XLA = Kernels()

# Up to this many tokens (rows of a linear's input) the packed linears run
# `decode_matmul`, which reads the int4 weights at a larger share of HBM
# bandwidth than the prefill matmuls (BENCHMARKS.md, decode matmul).
DECODE_ROWS = 16


@functools.cache
def _platform() -> tuple[bool, bool]:
  """(has a GPU, that GPU is a Hopper (sm_90))."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return False, False
  if not gpus:
    return False, False
  cc = getattr(gpus[0], "compute_capability", "")
  return True, str(cc).startswith("9")


@functools.cache
def _cuda() -> bool:
  """Whether the GPU is an NVIDIA one (CUDA: cuDNN attention runs)."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return False
  version = getattr(getattr(gpus[0], "client", None), "platform_version",
                    "") if gpus else ""
  return "cuda" in str(version).lower()


def resolve(kernels: "str | Kernels | None" = None) -> Kernels:
  """The kernel choice for a setting on this platform.

  Args:
    kernels: a `Kernels` (returned as is), one of `SETTINGS`, or None
      ('auto').

  Returns:
    The resolved `Kernels`; its `layer_loop` is 'unrolled' on a GPU and
    'scan' on a CPU, whatever the setting.

  Raises:
    ValueError: an unknown setting, or one this platform cannot run
      ('mosaic' without a Hopper GPU, 'triton'/'mosaic' without a GPU).
  """
  if isinstance(kernels, Kernels):
    return kernels
  choice = _resolve_ops(kernels)
  gpu, _ = _platform()
  return dataclasses.replace(choice,
                             layer_loop="unrolled" if gpu else "scan")


def _resolve_ops(kernels: "str | None") -> Kernels:
  """`resolve` for a setting, before the layer loop is set."""
  setting = "auto" if kernels is None else kernels
  if setting not in SETTINGS:
    raise ValueError(f"kernels={setting!r} must be one of {SETTINGS}")
  gpu, hopper = _platform()
  if setting in ("xla", "reference"):
    return XLA
  if setting == "interpret":
    return Kernels(w4a4="triton", w4a16="pallas", hadamard_quant="pallas",
                   kv4_attention="pallas", decode_attention="pallas",
                   decode_matmul="triton", rms_norm_quant="pallas",
                   prefill_qkv="pallas", interpret=True)
  if setting == "auto":
    if not gpu:
      choice = XLA
    else:
      choice = Kernels(w4a4="mosaic" if hopper else "triton",
                       w4a16="pallas", hadamard_quant="pallas",
                       kv4_attention="pallas", decode_attention="pallas",
                       decode_matmul="mosaic" if hopper else "triton",
                       rms_norm_quant="pallas", prefill_qkv="pallas",
                       attention="cudnn" if _cuda() else "xla")
    logging.info("kernels='auto' resolved to %s", choice)
    return choice
  if not gpu:
    raise ValueError(f"kernels={setting!r} needs a GPU; this machine has"
                     " none (use 'auto', 'xla' or 'interpret')")
  if setting == "mosaic" and not hopper:
    raise ValueError("kernels='mosaic' needs a Hopper GPU (sm_90)")
  return Kernels(w4a4=setting, w4a16="pallas", hadamard_quant="pallas",
                 kv4_attention="pallas", decode_attention="pallas",
                 decode_matmul=setting, rms_norm_quant="pallas",
                 prefill_qkv="pallas", attention="cudnn" if _cuda() else "xla")
