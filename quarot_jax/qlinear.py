"""Packed int4 linears: the params format and the linear that runs them.

A decoder linear quantized for real holds, instead of a float
`kernel [in, out]`:

  qweight  uint8[out, in // 2]  int4 codes (`pallas_kernels/int4_layout.py`,
                                K-major)
  wscale   f32[out]             symmetric per-output-channel scales, or
           f32[out, G]          one per group of in / G inputs (the 128G
                                mode, `QuaRotConfig(w_groupsize=...)`)
  bias     [out]                (Qwen2 only, kept in float)

stacked on the leading L axis like every layer param. `linear` runs one:
with 4-bit activations it quantizes the input per token (fusing the online
Hadamard when asked) with `pallas_kernels.hadamard_quant` and multiplies with
`w4a4_matmul` (the Mosaic GPU wgmma kernel on Hopper, fed int8 activation
codes, which it reads from shared memory faster than packed ones; the
Triton kernel, fed packed codes, on other GPUs); with float activations it
runs the W4A16 kernel. Up to 16 tokens (decode) both run
`pallas_kernels.decode_matmul` instead, and `linears` quantizes one input
once for several linears (q/k/v, gate/up). Which backend each op runs
comes resolved in `kernels` (`quarot_jax.kernels`): on a CPU the plain-jnp references run the
same code path, and CI tests the kernels in interpret mode.

Supported: 4-bit symmetric weights, per channel or in groups along `in`;
activations 4-bit symmetric per token, or unquantized (16). Asymmetric
weights and other bit-widths raise NotImplementedError (the simulated path
covers them). Group scales run the prefill W4A4 kernels at every token
count (`decode_matmul` takes per-channel scales only): Mosaic's grouped wt
kernel for groups of a multiple of 128, Triton otherwise; with float
activations XLA runs one dot per group on the int4 values
(`_grouped_w4a16_matmul`).
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels import decode_matmul as decode_lib
from pallas_kernels import hadamard_quant as hq_lib
from pallas_kernels import rms_norm_quant as rq_lib
from pallas_kernels import w4a16_matmul as w4a16_lib
from pallas_kernels.w4a4_matmul import api as w4a4_lib
from quarot_jax import hadamard
from quarot_jax import kernels as kernels_lib
from quarot_jax import layers
from quarot_jax import quant

Params = dict[str, Any]


def is_packed(p: Params) -> bool:
  """Whether a linear's params (or a whole model's) hold packed weights."""
  if "qweight" in p:
    return True
  layers = p.get("layers")
  if isinstance(layers, (list, tuple)):  # run_layout.unstack_layers
    layers = layers[0] if layers else None
  return bool(layers) and "qweight" in layers["mlp"]["down_proj"]


def is_grouped(p: Params) -> bool:
  """Whether a packed linear has group scales (wscale [..., out, G])."""
  return p["wscale"].ndim == p["qweight"].ndim


def check_weight_qarray(q: quant.QArray, name: str = "weight") -> None:
  """Raises if `q` is not what the int4 kernels take.

  Raises:
    NotImplementedError: bits != 4 or an odd group size (groups must not
      split a packed byte).
  """
  if q.bits != 4:
    raise NotImplementedError(
        f"{name}: packed linears need 4-bit weights, got bits={q.bits}")
  if q.group_size % 2:
    raise NotImplementedError(
        f"{name}: packed linears need an even weight group size (two int4"
        f" values a byte), got group_size={q.group_size}")


def dequantize_weight(p: Params) -> jax.Array:
  """f32[..., out, in]: a packed linear's int4 values (less the zero points
  of asymmetric weights) times their scales."""
  w = quant.unpack_int4(p["qweight"], signed=True).astype(jnp.float32)
  zero = p.get("wzero")
  if not is_grouped(p):
    w = w if zero is None else w - zero[..., None]
    return w * p["wscale"][..., None]
  groups = p["wscale"].shape[-1]
  wg = w.reshape(*w.shape[:-1], groups, -1)
  if zero is not None:
    wg = wg - zero[..., None]
  return (wg * p["wscale"][..., None]).reshape(w.shape)


def pack_weight(q: quant.QArray) -> Params:
  """A linear's packed params from its weight `QArray`.

  Args:
    q: values int8[..., out, in] (or packed), scale f32[..., out, G]
      (G = 1: per channel).

  Returns:
    {"qweight": uint8[..., out, in // 2], "wscale": f32[..., out]} per
    channel, or wscale f32[..., out, G] with groups. Asymmetric weights
    w = s (q - z), q in [0, 15], are stored as the signed codes c = q - 8
    and "wzero" = z - 8 (f32 integers, wscale's shape): w = s (c - wzero),
    so a linear is s (x . c) - s wzero (sum of x), and the int4 kernels run
    unchanged.

  Raises:
    NotImplementedError: see `check_weight_qarray`.
  """
  check_weight_qarray(q)
  squeeze = (lambda a: a[..., 0]) if q.scale.shape[-1] == 1 else (
      lambda a: a)
  zero = None
  if not q.symmetric:
    q = quant.unpack(q)  # the codes move from [0, 15] to [-8, 7]
    zero = squeeze(q.zero - 8)
    q = dataclasses.replace(
        q, values=(q.values.astype(jnp.int32) - 8).astype(jnp.int8),
        zero=None, symmetric=True)
  q = quant.pack(q)
  out = {"qweight": jnp.asarray(q.values, jnp.uint8),
         "wscale": jnp.asarray(squeeze(q.scale), jnp.float32)}
  if zero is not None:
    out["wzero"] = jnp.asarray(zero, jnp.float32)
  return out


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
      kernel = jnp.swapaxes(dequantize_weight(node), -1, -2)
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
  quantize = jax.jit(lambda w: quant.quantize_layers(w, spec))
  return {(block, name): quantize(jnp.asarray(
      params["layers"][block][name]["kernel"], jnp.float32))
          for block, name in linears}


def linear(x: jax.Array, p: Params, *, a_spec: Any, online_hadamard: bool,
           kernels: kernels_lib.Kernels = kernels_lib.XLA,
           residual: jax.Array | None = None,
           gate_up: bool = False) -> jax.Array:
  """y = Q(H x) · W_qᵀ (+ bias) (+ residual) for a packed linear.

  Args:
    x: float[..., in] input (not yet rotated by the online Hadamard).
    p: {"qweight": uint8[out, in // 2], "wscale": f32[out], "bias"?,
      "wzero"? (asymmetric weights' zero points, f32[out]; `pack_weight`)}.
    a_spec: the activation `QuantSpec` (4-bit symmetric per token), or None
      for float activations (W4A16).
    online_hadamard: apply the Hadamard of size `in` first (down_proj and
      o_proj inputs after QuaRot).
    kernels: the resolved kernel choice (`kernels.resolve`); each op runs
      the backend it names. Default: the XLA references.
    residual: [..., out] in the dtype of x, added to y (a decoder layer's
      residual stream), or None. The prefill W4A4 matmul adds it in its
      epilogue (`w4a4_matmul`'s `residual`), so the add is no pass of its
      own; elsewhere, and after a bias, it is `y + residual` in XLA: the
      same numbers either way.
    gate_up: x is a fused gate/up output [..., 2 * in] (gate first) and
      the linear's input is `swiglu(gate, up)` (down_proj): with 4-bit
      activations the quantizer forms it as it loads x (`hadamard_quant`'s
      `gate_up`), so a prefill runs no SwiGLU pass of its own.

  Returns:
    [..., out] in the dtype of x.

  Raises:
    NotImplementedError: an activation spec the kernels do not run.
    ValueError: a residual of another shape or dtype than the output.
  """
  (y,) = linears(x, (p,), a_spec=a_spec, online_hadamard=online_hadamard,
                 kernels=kernels, residual=residual, gate_up=gate_up)
  return y


def linears(x: jax.Array, ps: Sequence[Params], *, a_spec: Any,
            online_hadamard: bool,
            kernels: kernels_lib.Kernels = kernels_lib.XLA,
            norm: tuple[jax.Array, float] | None = None,
            residual: jax.Array | None = None,
            gate_up: bool = False) -> list[jax.Array]:
  """`linear` of one input through several packed linears (q/k/v, gate/up).

  The input is rotated and quantized once for all of them. Up to
  `kernels.DECODE_ROWS` tokens the matmuls are `decode_matmul` (int4
  weights as the wgmma register operand, split over K), unless
  `kernels.decode_matmul` is 'xla'; more tokens run the prefill kernels.
  Both compute the same numbers: int4 codes times int4 weights summed
  exactly, scaled by s_x * s_w (W4A4), or bf16 x times int4 weights (W4A16).
  With `norm`, x is the un-normalized residual and `layers.rms_norm` runs
  first; with 4-bit activations and `kernels.rms_norm_quant` 'pallas' the
  norm and the quantizer are one launch (`pallas_kernels.rms_norm_quant`,
  the same numbers), at decode and at prefill.

  Args:
    x: float[..., in] input (not yet rotated by the online Hadamard).
    ps: packed linears' params, each as in `linear`, all of width `in`.
    a_spec: as in `linear`.
    online_hadamard: as in `linear`.
    kernels: as in `linear`.
    norm: (weight [in], eps) of an RMS norm to apply to x first (the
      decoder's pre-norm), or None.
    residual: as in `linear`; only with one linear.
    gate_up: as in `linear` (not with `norm`).

  Returns:
    One [..., out_i] array per linear, in the dtype of x.

  Raises:
    NotImplementedError: an activation spec the kernels do not run.
    ValueError: gate_up with a norm, or a residual as in `linear`.
  """
  if gate_up and norm is not None:
    raise ValueError("gate_up=True (x is gate | up) takes no pre-norm")
  if gate_up and (a_spec is None or not a_spec.enabled):
    x, gate_up = hq_lib.swiglu(*jnp.split(x, 2, axis=-1)), False  # W4A16
  lead, k = x.shape[:-1], x.shape[-1] // (2 if gate_up else 1)
  x2 = x.reshape(-1, x.shape[-1])  # [M, in] ([M, 2 * in] with gate_up)
  m = x2.shape[0]
  if residual is not None:
    want = (*lead, ps[0]["qweight"].shape[-2]) if len(ps) == 1 else None
    if residual.shape != want or residual.dtype != x.dtype:
      raise ValueError(
          f"residual must be {x.dtype.name}{list(want or ())} (one linear's"
          f" output), got {residual.dtype.name}{list(residual.shape)} for"
          f" {len(ps)} linears")

  def decode(p):  # decode_matmul's shape limits are the kernel's own
    return (m <= kernels_lib.DECODE_ROWS and kernels.decode_matmul != "xla"
            and not is_grouped(p)  # it takes per-channel scales only
            and decode_lib.can_use_decode_matmul(
                m, p["qweight"].shape[-2], k, kernels.decode_matmul))

  fuse_norm = (norm is not None and a_spec is not None and a_spec.enabled
               and not online_hadamard
               and kernels.rms_norm_quant == "pallas")
  if norm is not None and not fuse_norm:
    x2 = layers.rms_norm(x2, norm[0], eps=norm[1],
                         keep_roundings=a_spec is not None and a_spec.enabled)
  float_x = a_spec is None or not a_spec.enabled  # W4A16
  if not float_x and any("wzero" in p for p in ps):
    raise NotImplementedError(
        "packed linears with asymmetric weights (wzero) run with float"
        f" activations (W4A16) only; got {a_spec}")
  rows = None
  mp = m
  if ps and all(map(decode, ps)):
    mp = decode_lib.padded_rows(m, kernels.decode_matmul)
  if mp > m and not float_x:  # the quantizer writes the padding rows
    rows = m
  elif mp > m and x2.dtype == jnp.bfloat16:
    # W4A16: the rows decode_matmul computes, padded here in bf16: XLA fuses
    # the pad into the op that produced x (a norm, SwiGLU), where
    # decode_matmul's own pad would be one more launch.
    rows, x2 = m, jnp.pad(x2, ((0, mp - m), (0, 0)))
  run_decode = functools.partial(
      decode_lib.decode_matmul, out_dtype=x.dtype, rows=rows,
      implementation=kernels.decode_matmul, interpret=kernels.interpret)
  if float_x:
    if online_hadamard:
      x2 = hadamard.fast_hadamard_transform(
          x2.astype(jnp.float32)).astype(x.dtype)
    ys = [run_decode(x2, p["qweight"], p["wscale"])
          if decode(p) and x2.dtype == jnp.bfloat16  # it rounds x to bf16
          else _grouped_w4a16_matmul(x2, p) if is_grouped(p)
          else w4a16_lib.w4a16_matmul(x2, p["qweight"], p["wscale"],
                                      implementation=kernels.w4a16,
                                      interpret=kernels.interpret)
          for p in ps]
    if any("wzero" in p for p in ps):
      ys = [_less_zeros(y, x2[:m], p) if "wzero" in p else y
            for y, p in zip(ys, ps)]
  else:
    if (a_spec.bits != 4 or not a_spec.symmetric
        or a_spec.group_size is not None):
      raise NotImplementedError(
          f"packed linears quantize activations to 4-bit symmetric per"
          f" token; got {a_spec}")
    # The Mosaic matmuls read int8 codes from shared memory faster than
    # packed ones (BENCHMARKS.md), and decode_matmul takes only int8 codes;
    # the Triton prefill kernel takes packed codes.
    packed = kernels.w4a4 != "mosaic" and not any(map(decode, ps))
    out_rows = mp if rows else None  # padded for decode_matmul
    if fuse_norm:
      x_q, s_x = rq_lib.rms_norm_quant(
          x2, norm[0], eps=norm[1], clip_ratio=a_spec.clip_ratio,
          packed=packed, out_rows=out_rows, implementation="pallas",
          interpret=kernels.interpret)
    else:
      x_q, s_x = hq_lib.hadamard_quant(
          x2, hadamard_base(k) if online_hadamard else None,
          clip_ratio=a_spec.clip_ratio, packed=packed, out_rows=out_rows,
          implementation=kernels.hadamard_quant, interpret=kernels.interpret,
          gate_up=gate_up, config=kernels.hadamard_config)
    # The residual rides in the prefill matmul's epilogue; after a bias
    # (no LLaMA/Qwen o_proj or down_proj has one) it is added in XLA.
    fused = (residual is not None and kernels.residual_in_matmul
             and not decode(ps[0]) and "bias" not in ps[0])
    ys = [run_decode(x_q, p["qweight"], p["wscale"], s_x) if decode(p)
          else w4a4_lib.w4a4_matmul(
              x_q, p["qweight"], s_x, p["wscale"], out_dtype=x.dtype,
              implementation=_w4a4_backend(p, kernels),
              interpret=kernels.interpret,
              residual=residual.reshape(m, -1) if fused else None)
          for p in ps]
    if fused:
      residual = None
  out = []
  for p, y in zip(ps, ys):
    if "bias" in p:
      y = y + p["bias"].astype(y.dtype)
    y = y.astype(x.dtype).reshape(*lead, y.shape[-1])
    out.append(y if residual is None else y + residual)
  return out


def _less_zeros(y: jax.Array, x: jax.Array, p: Params) -> jax.Array:
  """y - s wzero (sum of x): asymmetric weights' zero points.

  y [M, out] the codes' product (scaled), x [M, in] what they multiplied;
  per channel the row sums of x times s wzero [out], with groups each
  group's sums [M, G] times s wzero [out, G]; in f32.
  """
  xf = x.astype(jnp.float32)
  shift = p["wscale"] * p["wzero"]
  if is_grouped(p):
    sums = xf.reshape(x.shape[0], shift.shape[-1], -1).sum(-1)  # [M, G]
    extra = jnp.dot(sums, shift.T, precision=lax.Precision.HIGHEST)
  else:
    extra = xf.sum(-1, keepdims=True) * shift
  return (y.astype(jnp.float32) - extra).astype(y.dtype)


def _w4a4_backend(p: Params, kernels: kernels_lib.Kernels) -> str:
  """The prefill W4A4 backend for `p`: Mosaic's grouped kernel needs groups
  of a multiple of 128 (one wgmma K step each); smaller ones run Triton."""
  if kernels.w4a4 == "mosaic" and is_grouped(p):
    group = 2 * p["qweight"].shape[-1] // p["wscale"].shape[-1]
    if group % 128:
      return "triton"
  return kernels.w4a4


def _grouped_w4a16_matmul(x: jax.Array, p: Params) -> jax.Array:
  """W4A16 with group scales, x [M, in] -> [M, out] in x's dtype.

  One batched dot over the G groups, x [M, G, g] times the int4 values
  [out, G, g] (both in x's float dtype, where the integers are exact; f32
  sums), then each group's sum times its scale, added over the groups in
  f32. The weights are read as int4 (XLA fuses their widening into the
  dot); before, each call built f32[out, in] weights (8.5 bytes moved per
  weight instead of 0.5) and multiplied those.
  """
  n, k = p["qweight"].shape[0], 2 * p["qweight"].shape[1]
  groups = p["wscale"].shape[-1]
  dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  w = lax.bitcast_convert_type(p["qweight"], jnp.int4).reshape(n, k)
  w = w.astype(dtype).reshape(n, groups, k // groups)
  xg = x.astype(dtype).reshape(x.shape[0], groups, k // groups)
  acc = lax.dot_general(  # [G, M, N]: sum of exact products per group
      xg, w, (((2,), (2,)), ((1,), (1,))),
      precision=(lax.Precision.HIGHEST if dtype == jnp.float32 else None),
      preferred_element_type=jnp.float32)
  scales = p["wscale"].astype(jnp.float32).T[:, None, :]  # [G, 1, N]
  return (acc * scales).sum(axis=0).astype(x.dtype)


def hadamard_base(k: int) -> jax.Array:
  """f32[m, m]: the base B_m of H_K = kron(S_{K/m}, B_m) that
  `hadamard_quant` takes (m from `hadamard.factorize(K)`)."""
  _, m = hadamard.factorize(k)
  return jnp.asarray(hadamard.hadamard_matrix(m))
