"""Packed int4 linears: the params format and the linear that runs them.

A decoder linear quantized for real holds, instead of a float
`kernel [in, out]`:

  qweight  uint8[out, in // 2]  int4 codes, packed as in `quant.py` (K-major)
  wscale   f32[out]             symmetric per-output-channel scales
  bias     [out]                (Qwen2 only, kept in float)

stacked on the leading L axis like every layer param. `linear` runs one:
with 4-bit activations it quantizes the input per token (fusing the online
Hadamard when asked) with `pallas_kernels.hadamard_quant` and multiplies with
`w4a4_matmul` (the Mosaic GPU wgmma kernel on Hopper, fed int8 activation
codes, which it reads from shared memory faster than packed ones; the
Triton kernel, fed packed codes, on other GPUs); with float activations it
runs the W4A16 kernel. Each kernel falls back to its plain-jnp reference off
the GPU, so the CPU runs the same code path and CI tests it.

Supported: 4-bit symmetric per-channel weights; activations 4-bit symmetric
per token, or unquantized (16). Weight groups, asymmetric weights and other
bit-widths raise NotImplementedError (the simulated path covers them).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import hadamard_quant as hq_lib
from pallas_kernels import w4a16_matmul as w4a16_lib
from pallas_kernels.w4a4_matmul import api as w4a4_lib
from pallas_kernels.w4a4_matmul import mosaic_gpu as mgpu_lib
from quarot_jax import hadamard
from quarot_jax import quant

Params = dict[str, Any]


def is_packed(p: Params) -> bool:
  """Whether a linear's params (or a whole model's) hold packed weights."""
  if "qweight" in p:
    return True
  layers = p.get("layers")
  if isinstance(layers, (list, tuple)):  # model.unstack_layers
    layers = layers[0] if layers else None
  return bool(layers) and "qweight" in layers["mlp"]["down_proj"]


def check_weight_qarray(q: quant.QArray, name: str = "weight") -> None:
  """Raises if `q` is not what the int4 kernels take.

  Raises:
    NotImplementedError: bits != 4, asymmetric, or grouped along `in`.
  """
  if q.bits != 4:
    raise NotImplementedError(
        f"{name}: packed linears need 4-bit weights, got bits={q.bits}")
  if not q.symmetric:
    raise NotImplementedError(
        f"{name}: packed linears need symmetric weights (w_asym=False)")
  in_features = q.values.shape[-1] * (2 if q.packed else 1)
  if q.group_size != in_features:
    raise NotImplementedError(
        f"{name}: packed linears need per-channel weight scales, got"
        f" group_size={q.group_size} for in={in_features}")


def pack_weight(q: quant.QArray) -> Params:
  """A linear's packed params from its weight `QArray`.

  Args:
    q: values int8[..., out, in] (or packed), scale f32[..., out, 1].

  Returns:
    {"qweight": uint8[..., out, in // 2], "wscale": f32[..., out]}.

  Raises:
    NotImplementedError: see `check_weight_qarray`.
  """
  check_weight_qarray(q)
  q = quant.pack(q)
  return {"qweight": jnp.asarray(q.values, jnp.uint8),
          "wscale": jnp.asarray(q.scale[..., 0], jnp.float32)}


def pack_params(params: Params, qarrays: dict[tuple[str, str],
                                              quant.QArray]) -> Params:
  """Replaces decoder linears' float kernels by packed int4 weights.

  Args:
    params: the model params (rotated, float).
    qarrays: `(block, name)` -> the layer-stacked weight `QArray`
      (values [L, out, in]), e.g. from `gptq_quantize_params(...,
      return_qarrays=True)` or `quantize_weights_rtn`.

  Returns:
    New params; every other leaf is shared with `params`.
  """
  layers = dict(params["layers"])
  for (block, name), q in qarrays.items():
    layers[block] = dict(layers[block])
    node = {k: v for k, v in layers[block][name].items() if k != "kernel"}
    node.update(pack_weight(q))
    layers[block][name] = node
  return {**params, "layers": layers}


def dequantize_params(params: Params) -> Params:
  """The simulated-quantization twin of packed params: float kernels
  [L, in, out] holding exactly the dequantized int4 weights.

  Args:
    params: params with packed linears (`pack_params`).

  Returns:
    New params where each packed linear has `kernel` f32 again.
  """
  layers = dict(params["layers"])
  for block, linears in params["layers"].items():
    if not isinstance(linears, dict):
      continue
    for name, node in linears.items():
      if not isinstance(node, dict) or "qweight" not in node:
        continue
      w = quant.unpack_int4(node["qweight"], signed=True).astype(jnp.float32)
      kernel = jnp.swapaxes(w * node["wscale"][..., None], -1, -2)
      layers[block] = dict(layers[block])
      layers[block][name] = {
          **{k: v for k, v in node.items() if k not in ("qweight", "wscale")},
          "kernel": kernel}
  return {**params, "layers": layers}


def quantize_weights_rtn(params: Params, linears, spec: quant.QuantSpec
                         ) -> dict[tuple[str, str], quant.QArray]:
  """Round-to-nearest weight `QArray`s of the given decoder linears.

  Args:
    params: float params; kernels [L, in, out].
    linears: iterable of (block, name).
    spec: the weight quantizer.

  Returns:
    `(block, name)` -> QArray with values int8[L, out, in].
  """
  quantize = jax.jit(jax.vmap(lambda w: quant.quantize_weight(w, spec)))
  return {(block, name): quantize(jnp.asarray(
      params["layers"][block][name]["kernel"], jnp.float32))
          for block, name in linears}


def linear(x: jax.Array, p: Params, *, a_spec: Any, online_hadamard: bool,
           implementation: str | None = None,
           interpret: bool = False,
           matmul_implementation: str | None = None) -> jax.Array:
  """y = Q(H x) · W_qᵀ (+ bias) for a packed linear.

  Args:
    x: float[..., in] input (not yet rotated by the online Hadamard).
    p: {"qweight": uint8[out, in // 2], "wscale": f32[out], "bias"?}.
    a_spec: the activation `QuantSpec` (4-bit symmetric per token), or None
      for float activations (W4A16).
    online_hadamard: apply the Hadamard of size `in` first (down_proj and
      o_proj inputs after QuaRot).
    implementation: None (Pallas on a GPU, else the jnp references),
      'pallas' or 'xla' (the references).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    matmul_implementation: overrides `implementation` for the matmul; also
      'mosaic' or 'triton' to pick the W4A4 kernel (see `w4a4_matmul`).

  Returns:
    [..., out] in the dtype of x.

  Raises:
    NotImplementedError: an activation spec the kernels do not run.
  """
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)  # [M, in]
  impl = dict(implementation=implementation, interpret=interpret)
  mm_impl = dict(impl, implementation=matmul_implementation or implementation)
  if a_spec is None or not a_spec.enabled:
    if online_hadamard:
      x2 = hadamard.fast_hadamard_transform(
          x2.astype(jnp.float32)).astype(x.dtype)
    if mm_impl["implementation"] in ("mosaic", "triton"):
      mm_impl["implementation"] = "pallas"  # W4A16 has one kernel.
    y = w4a16_lib.w4a16_matmul(x2, p["qweight"], p["wscale"], **mm_impl)
  else:
    if (a_spec.bits != 4 or not a_spec.symmetric
        or a_spec.group_size is not None):
      raise NotImplementedError(
          f"packed linears quantize activations to 4-bit symmetric per"
          f" token; got {a_spec}")
    mm_impl["implementation"] = w4a4_kernel(**mm_impl)
    x_q, s_x = hq_lib.hadamard_quant(
        x2, hadamard_base(k) if online_hadamard else None,
        clip_ratio=a_spec.clip_ratio,
        packed=mm_impl["implementation"] != "mosaic", **impl)
    y = w4a4_matmul(x_q, p["qweight"], s_x, p["wscale"],
                    out_dtype=x.dtype, **mm_impl)
  if "bias" in p:
    y = y + p["bias"].astype(y.dtype)
  return y.reshape(*lead, y.shape[-1])


def hadamard_base(k: int) -> jax.Array:
  """f32[m, m]: the base B_m of H_K = kron(S_{K/m}, B_m) that
  `hadamard_quant` takes (m from `hadamard.factorize(K)`)."""
  _, m = hadamard.factorize(k)
  return jnp.asarray(hadamard.hadamard_matrix(m))


def w4a4_kernel(implementation: str | None = None,
                interpret: bool = False) -> str | None:
  """The W4A4 matmul `w4a4_matmul` runs for `implementation`: 'mosaic' for
  None/'pallas' on a Hopper GPU (and not `interpret`), else unchanged.

  Raises:
    ValueError: an unknown implementation.
  """
  if implementation not in (None, "pallas", "mosaic", "triton", "xla"):
    raise ValueError(f"unknown W4A4 matmul implementation {implementation!r}")
  if implementation in (None, "pallas") and not interpret and (
      mgpu_lib.can_use_w4a4_mosaic()):
    return "mosaic"
  return implementation


def w4a4_matmul(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                s_w: jax.Array, *, out_dtype=jnp.bfloat16,
                implementation: str | None = None,
                interpret: bool = False) -> jax.Array:
  """y = (x_q · w_qᵀ) * s_x * s_w with the fastest W4A4 kernel available.

  Args:
    x_q: uint8[M, K // 2] packed int4 activations (quant.py layout), or
      int8[M, K] codes in [-8, 7] (`hadamard_quant(..., packed=False)`):
      what the Mosaic kernel reads fastest; packed here for the others.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] per-token scales.
    s_w: f32[N] per-output-channel scales.
    out_dtype: dtype of y.
    implementation: None or 'pallas' (the Mosaic GPU wgmma kernel on a
      Hopper GPU, the Triton kernel on other GPUs and under `interpret`),
      'mosaic', 'triton', or 'xla' (the jnp reference: int8 unpack + XLA's
      int8 matmul).
    interpret: run the Triton kernel in interpret mode (CPU tests; Mosaic
      GPU's interpreter does not run the wgmma kernel).

  Returns:
    y: [M, N] in `out_dtype`.

  Raises:
    ValueError: an unknown implementation.
  """
  implementation = w4a4_kernel(implementation, interpret)
  if implementation == "pallas":
    implementation = "triton"
  return w4a4_lib.w4a4_matmul(x_q, w_q, s_x, s_w, out_dtype=out_dtype,
                              implementation=implementation,
                              interpret=interpret)


def weight_bytes(params: Params) -> int:
  """Bytes of all array leaves (to compare packed and float models)."""
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(params))
