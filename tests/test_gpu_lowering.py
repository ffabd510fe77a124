"""The packed W4A4KV4 model, lowered for a GPU on the CPU.

No CPU runs the GPU kernels, but `lower(lowering_platforms=("cuda",))` runs
the Pallas Triton and Mosaic GPU lowerings of every kernel the model calls,
with the shapes and arguments the model passes. Those lowerings refuse what
they do not take (a nested ref indexer, a wrong scratch shape) here, in
seconds, instead of in a scarce GPU call. Kernel *selection* reads the
platform, so the tests pretend to be on a GPU (`as_if_on_gpu`).
"""

import dataclasses
import functools
import re

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import pytest

from experiments.lab import speed
from pallas_kernels import decode_matmul as dm
from pallas_kernels import rms_norm_quant as rq
from pallas_kernels.w4a4_matmul import mosaic_gpu
from quarot_jax import hf
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout


@pytest.fixture
def as_if_on_gpu(monkeypatch):
  """`pretend(hopper)`: kernel selection sees an NVIDIA GPU (an H100/H200
  when `hopper`) with 132 SMs."""

  def pretend(hopper: bool) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernels_lib, "_platform", lambda: (True, hopper))
    monkeypatch.setattr(kernels_lib, "_cuda", lambda: False)  # no cuDNN
    monkeypatch.setattr(dm, "is_hopper", lambda: hopper)
    monkeypatch.setattr(mosaic_gpu, "can_use_w4a4_mosaic", lambda: hopper)
    monkeypatch.setattr(mosaic_gpu, "_num_sms",
                        lambda cfg: cfg.num_sms or 132)

  return pretend


def _lowered(kv_heads: int, batch: int, tokens: int,
             kernels: kernels_lib.Kernels) -> str:
  """StableHLO of one packed forward (a decode step when tokens == 1)."""
  config = hf.LlamaConfig(vocab_size=256, hidden_size=512,
                          intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=kv_heads,
                          head_dim=64, rms_norm_eps=1e-5)
  params = model.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
  params = run_layout.unstack_layers(
      speed.packed_like(params, jax.random.key(1)), fuse=True)
  cache = kv_cache.cache_for(config, batch, 128, packed=True, per_layer=True)
  forward = jax.jit(functools.partial(
      model.forward, config=config, kernels=kernels,
      options=speed.W4A4KV4.run_options(config.head_dim)))
  return forward.trace(params, jnp.zeros((batch, tokens), jnp.int32),
                       cache=cache).lower(
                           lowering_platforms=("cuda",)).as_text()


def _triton_kernels(text: str) -> set[str]:
  return set(re.findall(r'name = "([a-z0-9_]+)", num_stages', text))


@pytest.mark.parametrize("kv_heads", [8, 2])  # MHA, GQA
@pytest.mark.parametrize("batch", [1, 16])
def test_hopper_decode_step_lowers(as_if_on_gpu, kv_heads, batch):
  as_if_on_gpu(hopper=True)
  kernels = kernels_lib.resolve("auto")
  assert kernels.decode_matmul == "mosaic" and kernels.w4a4 == "mosaic"
  text = _lowered(kv_heads, batch, 1, kernels)
  assert "mosaic_gpu" in text  # the decode matmuls
  assert {"decode_qkv", "kv4_decode_attention", "rms_norm_quant",
          "hadamard_quant"} <= _triton_kernels(text)


def test_hopper_prefill_lowers(as_if_on_gpu):
  as_if_on_gpu(hopper=True)
  text = _lowered(2, 1, 64, kernels_lib.resolve("auto"))
  assert "mosaic_gpu" in text  # the W4A4 prefill matmuls, weights in
  assert "w4a4_matmul_mosaic_wt" in text  # registers (`mosaic_gpu`)
  assert {"rms_norm_quant", "hadamard_quant"} <= _triton_kernels(text)


def test_hopper_prefill_lowers_with_prefill_qkv(as_if_on_gpu):
  # Off in the GPU settings until timed; the lowering takes it already.
  as_if_on_gpu(hopper=True)
  kernels = dataclasses.replace(kernels_lib.resolve("auto"),
                                prefill_qkv="pallas")
  text = _lowered(2, 1, 64, kernels)
  assert {"prefill_qkv", "rms_norm_quant",
          "hadamard_quant"} <= _triton_kernels(text)


def test_other_gpu_decode_step_lowers_with_triton_matmuls(as_if_on_gpu):
  as_if_on_gpu(hopper=False)
  kernels = kernels_lib.resolve("auto")
  assert kernels.decode_matmul == "triton"
  text = _lowered(2, 1, 1, kernels)
  assert "mosaic_gpu" not in text
  assert {"decode_matmul", "decode_qkv", "kv4_decode_attention",
          "rms_norm_quant"} <= _triton_kernels(text)


def test_a_kernel_the_lowering_refuses_fails_here(as_if_on_gpu, monkeypatch):
  # The check has teeth: a kernel body the Triton lowering cannot take
  # (here a nested ref indexer, which it refuses) fails at lowering.
  as_if_on_gpu(hopper=True)
  real = rq.rms_norm_quant_kernel

  def nested(x_ref, w_ref, q_ref, s_ref, **kw):
    real(x_ref, w_ref, q_ref, s_ref, **kw)
    row = plgpu.load(x_ref.at[0].at[pl.ds(0, 1), :])  # stored: not DCE'd
    plgpu.store(q_ref.at[0, pl.ds(0, 1), :], row.astype(q_ref.dtype))

  monkeypatch.setattr(rq, "rms_norm_quant_kernel", nested)
  jax.clear_caches()  # rms_norm_quant's jit would reuse an earlier trace
  try:
    with pytest.raises(NotImplementedError, match="multiple indexers"):
      _lowered(2, 1, 1, kernels_lib.resolve("auto"))
  finally:  # no later test may reuse the broken trace
    monkeypatch.undo()
    jax.clear_caches()
