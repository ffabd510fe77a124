"""Greedy agreement of two quantized paths, and its one-ulp control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lab import agreement
from quarot_jax import generation
from quarot_jax import hf
from quarot_jax import quarot
from tests import hf_models

_PROMPTS = [[5, 9, 2, 7], [3, 8]]
_W4A4KV4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)


@pytest.fixture(scope="module")
def simulated():
  """(simulated W4A4KV4 params, config, options) of a tiny llama3."""
  params, config = hf.load_hf(hf_models.tiny_hf_model("llama3")[0])
  sim, options = quarot.quantize(params, config, _W4A4KV4, progress=False)
  return sim, config, options


def test_a_model_agrees_with_itself(simulated):
  sim, config, options = simulated
  got = agreement.greedy_agreement(sim, sim, config, _PROMPTS,
                                   options=options, kernels="xla",
                                   max_new_tokens=8)
  assert got["free_running"] == 1.0 and got["teacher_forced"] == 1.0
  assert got["first_divergence"] == [None, None]
  assert got["positions"] == 16


def test_another_model_disagrees_where_it_first_differs(simulated):
  sim, config, options = simulated
  other = jax.tree.map(lambda a: a, sim)  # a fresh dict tree
  other["lm_head"] = {"kernel": -sim["lm_head"]["kernel"]}
  got = agreement.greedy_agreement(sim, other, config, _PROMPTS,
                                   options=options, kernels="xla",
                                   max_new_tokens=8)
  assert got["free_running"] < 1.0 and got["teacher_forced"] < 1.0
  assert got["first_divergence"] == [0, 0]  # argmax -> argmin at once


def test_reference_tokens_are_not_generated_again(simulated, monkeypatch):
  # real_vs_simulated compares the packed path and the control against the
  # same simulated tokens: generated once, not once per comparison.
  sim, config, options = simulated
  want = generation.generate_tokens(sim, config, _PROMPTS, max_new_tokens=8,
                                    options=options, kernels="xla")
  calls = []
  generate = generation.generate_tokens
  monkeypatch.setattr(generation, "generate_tokens",
                      lambda p, *a, **k: calls.append(p) or generate(
                          p, *a, **k))
  got = agreement.greedy_agreement(sim, sim, config, _PROMPTS,
                                   options=options, kernels="xla",
                                   max_new_tokens=8, reference_tokens=want)
  assert len(calls) == 1 and got["free_running"] == 1.0


def test_ulp_perturbed_moves_each_decoder_kernel_by_one_ulp(simulated):
  sim, _, _ = simulated
  control = agreement.ulp_perturbed(sim, jax.random.key(1))
  a = np.asarray(sim["layers"]["mlp"]["down_proj"]["kernel"], np.float32)
  b = np.asarray(control["layers"]["mlp"]["down_proj"]["kernel"])
  nonzero = a != 0
  ratio = b[nonzero] / a[nonzero]
  np.testing.assert_allclose(np.abs(ratio - 1), 2.0**-23, rtol=0.5)
  assert (ratio > 1).any() and (ratio < 1).any()
  np.testing.assert_array_equal(np.asarray(control["lm_head"]["kernel"]),
                                np.asarray(sim["lm_head"]["kernel"]))
