"""The Flax face: `nn.Llama` is `model.forward` over `model.init_params`'s
layout, and every transform takes its variables as they are."""

import ast
import collections
import dataclasses
import inspect
import os

from flax import linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from quarot_jax import checkpoint
from quarot_jax import generation
from quarot_jax import hf
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import nn
from quarot_jax import quarot
from quarot_jax import rotation
from quarot_jax.config import LlamaConfig
from tests import hf_models

# GQA (G = 2), untied; sizes with Hadamards for the rotations.
TINY = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
W4A4KV4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)


def _tokens(batch=2, length=6, seed=0):
  return jnp.asarray(hf_models.random_tokens(TINY.vocab_size, batch, length,
                                             seed=seed))


@pytest.fixture(scope="module")
def variables():
  return jax.jit(nn.Llama(TINY).init)(jax.random.key(0), _tokens())


@pytest.fixture(scope="module")
def quantized(variables):
  """packed -> (quantized variables, options), W4A4KV4 from `variables`."""
  return {packed: quarot.quantize(variables, TINY, W4A4KV4, packed=packed,
                                  progress=False)
          for packed in (False, True)}


def _assert_same_tree(got, want):
  """Same structure and bit-identical leaves (dtypes included)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _assert_same_program(llama, variables, params, *args, **kwargs):
  """`llama.apply(variables, ...)` traces to `model.forward(params, ...)`'s
  very jaxpr: the same program, so the same bits on any backend."""
  cache = kwargs.pop("cache", None)
  got = jax.make_jaxpr(lambda v, c: llama.apply(v, *args, c, **kwargs))(
      variables, cache)
  want = jax.make_jaxpr(lambda p, c: model.forward(
      p, *args, llama.config, cache=c, options=llama.options, **kwargs))(
          params, cache)
  assert str(got) == str(want)


@pytest.mark.parametrize("tied,bias,dtype", [
    (False, False, jnp.float32),
    (True, True, jnp.bfloat16),
])
def test_init_layout_equals_init_params(tied, bias, dtype):
  config = dataclasses.replace(TINY, tie_word_embeddings=tied,
                               attention_bias=bias)
  got = jax.eval_shape(nn.Llama(config, param_dtype=dtype).init,
                       jax.random.key(0), _tokens())
  assert list(got) == ["params"]
  got = got["params"]
  want = jax.eval_shape(
      lambda k: model.init_params(config, k, dtype=dtype), jax.random.key(1))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert (g.shape, g.dtype) == (w.shape, w.dtype)
  assert ("lm_head" in got) == (not tied)
  assert ("bias" in got["layers"]["self_attn"]["q_proj"]) == bias


def test_init_values_follow_init_params(variables):
  want = jax.eval_shape(lambda k: model.init_params(TINY, k),
                        jax.random.key(1))
  got = variables["params"]
  assert list(variables) == ["params"]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert (g.shape, g.dtype) == (w.shape, w.dtype)
  # init_params' recipe: norm scales near 1 but not 1, kernels std 0.02.
  scale = np.asarray(got["norm"]["scale"])
  assert 0 < np.abs(scale - 1).max() < 1
  std = float(np.std(got["layers"]["mlp"]["up_proj"]["kernel"]))
  assert 0.015 < std < 0.025


def test_apply_equals_forward_bit_for_bit(variables):
  params = variables["params"]
  tokens = _tokens(seed=1)
  llama = nn.Llama(TINY)
  got, cache = llama.apply(variables, tokens)
  want, _ = model.forward(params, tokens, TINY)
  assert cache is None
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _assert_same_program(llama, variables, params, tokens, return_hidden=True)
  cache = kv_cache.cache_for(TINY, 2, 8)
  _assert_same_program(llama, variables, params, tokens[:, :4], cache=cache)
  _assert_same_program(llama, variables, params, tokens[:, 4:5], cache=cache)
  _assert_same_program(llama, variables, params, tokens[:, :4], cache=cache,
                       last_only=True)


@pytest.mark.skipif(
    "kernels" not in inspect.signature(model.forward).parameters,
    reason="model.forward has no kernels= argument yet")
def test_kernels_are_passed_to_forward(variables):
  tokens = _tokens(seed=1)
  llama = nn.Llama(TINY, kernels="reference")
  got = jax.make_jaxpr(lambda v: llama.apply(v, tokens))(variables)
  want = jax.make_jaxpr(lambda p: model.forward(
      p, tokens, TINY, kernels="reference"))(variables["params"])
  assert str(got) == str(want)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_parity_with_transformers(family):
  path, torch_model = hf_models.tiny_hf_model(family)
  params, config = hf.load_hf(path)
  tokens = hf_models.random_tokens(config.vocab_size, 2, 16)
  logits, _ = jax.jit(nn.Llama(config).apply)({"params": params}, tokens)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_quantize_round_trip_through_apply(variables, quantized, packed):
  qvariables, options = quantized[packed]
  want_params, want_options = quarot.quantize(
      variables["params"], TINY, W4A4KV4, packed=packed, progress=False)
  assert list(qvariables) == ["params"] and options == want_options
  assert ("qweight" in qvariables["params"]["layers"]["mlp"]["up_proj"]
          ) == packed
  _assert_same_tree(qvariables["params"], want_params)
  llama = nn.Llama(TINY, options)
  tokens = _tokens(seed=3)
  got, _ = llama.apply(qvariables, tokens)
  want, _ = model.forward(want_params, tokens, TINY, options=options)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Prefill and decode through the cache generation keeps (packed KV4 for
  # packed params).
  kv4 = model.uses_kv4_cache(qvariables["params"], options)
  assert kv4 == packed
  cache = kv_cache.cache_for(TINY, 2, 8, packed=kv4)
  _assert_same_program(llama, qvariables, want_params, tokens[:, :5],
                       cache=cache)
  _assert_same_program(llama, qvariables, want_params, tokens[:, 5:],
                       cache=cache)


def test_rotations_take_and_return_variables(variables):
  params = variables["params"]
  fused = rotation.fuse_norms(variables, TINY)
  _assert_same_tree(fused, {"params": rotation.fuse_norms(params, TINY)})
  q = jnp.eye(TINY.hidden_size)
  key = jax.random.key(4)
  for step, arg in ((lambda p: rotation.rotate(p, TINY, key), variables),
                    (lambda p: rotation.rotate_residual(p, q), fused),
                    (rotation.rotate_down_input, fused),
                    (lambda p: rotation.rotate_values_and_o(p, TINY), fused)):
    got = jax.eval_shape(step, arg)
    want = jax.eval_shape(step, arg["params"])
    assert list(got) == ["params"]
    assert got["params"] == want


def test_generate_takes_variables(variables):
  prompts = [[5, 9, 7], [3, 8]]
  got = generation.generate_tokens(variables, TINY, prompts,
                                   max_new_tokens=3)
  want = generation.generate_tokens(variables["params"], TINY, prompts,
                                    max_new_tokens=3)
  assert got == want and len(got[0]) >= 1


def test_checkpoints_take_variables(tmp_path, variables, quantized):
  path = checkpoint.save_params(variables, str(tmp_path / "f"), TINY)
  restored, config = checkpoint.load_params(path)
  assert config == TINY
  _assert_same_tree(restored, variables["params"])
  qvariables, options = quantized[True]
  path = checkpoint.save_quantized(qvariables, str(tmp_path / "q"), TINY,
                                   W4A4KV4)
  assert checkpoint.read_meta(path)["quantization"]["packed"]
  restored, _, qconfig, restored_options = checkpoint.load_quantized(path)
  assert (qconfig, restored_options) == (W4A4KV4, options)
  _assert_same_tree(restored, qvariables["params"])


def _direct_bytes(params):
  totals = collections.Counter()
  for leaf in jax.tree.leaves(params):
    totals[np.dtype(leaf.dtype).name] += leaf.nbytes
  return dict(totals)


def test_summary_counts_bytes_exactly(variables, quantized):
  packed, _ = quantized[True]
  for v in (variables, packed):
    want = _direct_bytes(v["params"])
    assert nn.bytes_per_dtype(v) == want
    assert nn.bytes_per_dtype(v["params"]) == want
    text = nn.summary(v)
    for dtype, nbytes in want.items():
      assert f"\n{dtype}: {nbytes:,} bytes" in text
    assert f"\ntotal: {sum(want.values()):,} bytes" in text
    # One row per leaf, plus header, two rules and the totals.
    assert len(text.splitlines()) == (len(jax.tree.leaves(v)) + 3
                                      + len(want) + 1)
  assert set(_direct_bytes(packed)) == {"float32", "uint8"}
  # Packed: int4 codes are half a byte per weight.
  up = packed["params"]["layers"]["mlp"]["up_proj"]
  assert up["qweight"].dtype == np.uint8
  assert up["qweight"].size * 2 == (
      TINY.num_hidden_layers * TINY.hidden_size * TINY.intermediate_size)
  assert "layers/mlp/up_proj/qweight" in nn.summary(packed)
  # Abstract params (jax.eval_shape) count the same with no memory; bf16
  # halves every float.
  abstract = jax.eval_shape(nn.Llama(TINY).init, jax.random.key(0),
                            _tokens())
  assert nn.summary(abstract) == nn.summary(variables)
  bf16 = jax.eval_shape(nn.Llama(TINY, param_dtype=jnp.bfloat16).init,
                        jax.random.key(0), _tokens())
  assert nn.bytes_per_dtype(bf16) == {
      "bfloat16": _direct_bytes(variables["params"])["float32"] // 2}


def test_flax_tabulate_counts_the_same_params(variables):
  table = linen.tabulate(nn.Llama(TINY), jax.random.key(0),
                         console_kwargs={"width": 200})(_tokens())
  count = sum(leaf.size for leaf in jax.tree.leaves(variables))
  assert f"Total Parameters: {count:,}" in table


def test_only_nn_imports_flax():
  package = os.path.dirname(model.__file__)
  importers = []
  for name in sorted(os.listdir(package)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(package, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""]
                 if isinstance(node, ast.ImportFrom) else [])
      if any(m == "flax" or m.startswith("flax.") for m in modules):
        importers.append(name)
  assert sorted(set(importers)) == ["nn.py"]
