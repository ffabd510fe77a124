"""The QuaRot recipe end to end on tiny models: invariance, then quantization
error with and without rotation."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from quarot_jax import experiment
from quarot_jax import hf
from quarot_jax import model
from quarot_jax import quarot
from tests import hf_models


def _kl(p_logits, q_logits):
  """Mean per-token KL(p || q) from two f32[..., V] logit arrays."""
  p = jax.nn.log_softmax(p_logits, -1)
  q = jax.nn.log_softmax(q_logits, -1)
  return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def outlier_model():
  """The tiny SmolLM-like model with two outlier residual channels."""
  params, config = hf.load_hf(hf_models.tiny_hf_model("smollm")[0])
  params = jax.tree.map(np.array, params)
  for name in ("input_layernorm", "post_attention_layernorm"):
    params["layers"][name]["scale"][:, [3, 40]] *= 30.0
  tokens = hf_models.random_tokens(config.vocab_size, 2, 32, seed=5)
  logits = np.asarray(model.forward(params, tokens, config)[0])
  return params, config, tokens, logits


def _run(params, config, tokens, qconfig, calib=None):
  qparams, options = quarot.quantize(params, config, qconfig, calib,
                                     progress=False)
  return np.asarray(model.forward(qparams, tokens, config,
                                  options=options)[0])


def test_16_bit_rotated_model_is_the_float_model(outlier_model):
  params, config, tokens, want = outlier_model
  got = _run(params, config, tokens, quarot.QuaRotConfig(rotate=True))
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_8_bit_is_nearly_lossless_with_rotation(outlier_model):
  params, config, tokens, want = outlier_model
  got = _run(params, config, tokens, quarot.QuaRotConfig(
      w_bits=8, a_bits=8, k_bits=8, v_bits=8))
  assert _kl(want, got) < 1e-3


def test_rotation_reduces_w4a4kv4_error(outlier_model):
  params, config, tokens, want = outlier_model
  w4a4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)
  kl_rot = _kl(want, _run(params, config, tokens, w4a4))
  kl_plain = _kl(want, _run(params, config, tokens,
                            dataclasses.replace(w4a4, rotate=False)))
  assert kl_rot < 0.5 * kl_plain, (kl_rot, kl_plain)


def test_gptq_beats_rtn_on_calibration_text(outlier_model):
  params, config, tokens, want = outlier_model
  calib = hf_models.random_tokens(config.vocab_size, 8, 32, seed=6)
  w4 = quarot.QuaRotConfig(w_bits=4, w_clip=False)
  calib_want = np.asarray(model.forward(params, calib, config)[0])
  kl_rtn = _kl(calib_want, _run(params, config, calib, w4))
  kl_gptq = _kl(calib_want, _run(params, config, calib, dataclasses.replace(
      w4, w_method="gptq"), calib))
  assert kl_gptq < kl_rtn, (kl_gptq, kl_rtn)


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=1), "w_bits=1"),
    (dict(a_bits=12), "a_bits=12"),
    (dict(w_method="awq"), "w_method='awq'"),
    (dict(rotate_mode="givens"), "rotate_mode='givens'"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quarot.QuaRotConfig(**kwargs)


def test_gptq_needs_calibration(outlier_model):
  params, config, _, _ = outlier_model
  with pytest.raises(ValueError, match="calib_tokens"):
    quarot.quantize(params, config, quarot.QuaRotConfig(
        w_bits=4, w_method="gptq"))


def test_sweep_writes_records_and_table(outlier_model, tmp_path):
  params, config, _, _ = outlier_model
  windows = hf_models.random_tokens(config.vocab_size, 3, 16, seed=7)
  configs = [quarot.QuaRotConfig(w_bits=8, a_bits=8, k_bits=8, v_bits=8)]
  jsonl, md = tmp_path / "r.jsonl", tmp_path / "r.md"
  records = experiment.run_sweep(
      params, config, configs, windows, eval_text="enwiki-gensim",
      model_name="tiny", command="pytest", out_jsonl=str(jsonl),
      out_md=str(md), batch_size=2, progress=False)
  assert [r["label"] for r in records] == ["W16A16KV16 norot",
                                           "W8A8KV8 rtn rot-hadamard"]
  lines = [json.loads(l) for l in jsonl.read_text().splitlines()]
  assert lines == records
  for key in ("w_bits", "a_bits", "k_bits", "v_bits", "w_method",
              "groupsize", "rotate", "ppl", "fp_ppl", "eval_text",
              "eval_tokens", "seqlen", "date", "command"):
    assert key in lines[1]
  assert lines[0]["ppl"] == lines[1]["fp_ppl"]
  assert "W8A8KV8 rtn rot-hadamard" in md.read_text()
  csv_lines = (tmp_path / "r.csv").read_text().splitlines()
  assert csv_lines[0].startswith("label,w_bits") and len(csv_lines) == 3


def test_group_size_divides_every_width():
  config = hf.LlamaConfig(vocab_size=10, hidden_size=576,
                          intermediate_size=1536, num_hidden_layers=1,
                          num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64)
  assert experiment.group_size_for(config) == 64  # 576 = 4.5 * 128
  config = dataclasses.replace(config, hidden_size=4096,
                               intermediate_size=11008,
                               num_attention_heads=32,
                               num_key_value_heads=32, head_dim=128)
  assert experiment.group_size_for(config) == 128


def test_table_keeps_the_latest_record_per_label(tmp_path):
  base = dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn",
              groupsize=None, rotate=True, rotate_mode="hadamard",
              delta_ppl=1.0, wall_s=1)
  path = tmp_path / "r.jsonl"
  path.write_text("\n".join(json.dumps(dict(base, label="a", ppl=p))
                            for p in (10.0, 12.5)) + "\n")
  table = experiment.table_from_jsonl(str(path))
  assert "12.500" in table and "10.000" not in table
