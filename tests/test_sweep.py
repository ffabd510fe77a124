"""The sweep loop on a tiny model, and the group size it picks."""

import dataclasses

import jax
import pytest

from quarot_jax import data
from quarot_jax import evaluate
from quarot_jax import hf
from quarot_jax import model
from quarot_jax import quarot
from quarot_jax import sweep
from quarot_jax.config import LlamaConfig
from tests import hf_models

# Heads, kv heads, FFN and vocabulary divide by 2 but not by 5; N·H = F = 96
# and their halves (48 = 4·12) have Hadamard matrices.
_TP_CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=12,
                         num_key_value_heads=6, head_dim=8)


@pytest.fixture(scope="module")
def tiny():
  return hf.load_hf(hf_models.tiny_hf_model("smollm")[0])


@pytest.fixture(scope="module")
def tp_model():
  init = jax.jit(model.init_params, static_argnames=("config", "scale"))
  return init(_TP_CONFIG, jax.random.key(0), scale=0.2)


def test_sweep_runs_float_first_and_reports_each_record(tiny):
  params, config = tiny
  windows = hf_models.random_tokens(config.vocab_size, 3, 16, seed=7)
  configs = [quarot.QuaRotConfig(w_bits=8, a_bits=8, k_bits=8, v_bits=8)]
  seen = []
  records = sweep.run_sweep(
      params, config, configs, windows, eval_text="enwiki-gensim",
      model_name="tiny", command="pytest", on_record=seen.append,
      batch_size=2, progress=False)
  assert [r["label"] for r in records] == ["W16A16KV16 norot",
                                           "W8A8KV8 rtn rot-hadamard"]
  assert seen == records
  for key in ("w_bits", "a_bits", "k_bits", "v_bits", "w_method",
              "w_asym", "groupsize", "rotate", "ppl", "fp_ppl", "eval_text",
              "eval_tokens", "seqlen", "date", "command", "device",
              "jax_version"):
    assert key in records[1]
  assert records[0]["ppl"] == records[1]["fp_ppl"]
  assert records[1]["delta_ppl"] == records[1]["ppl"] - records[0]["ppl"]
  assert records[1]["eval_tokens"] == 3 * 15 and records[1]["seqlen"] == 16
  # rotation_tp defaults to 1: the full-width transform, as before the flag.
  assert [r["rotation_tp"] for r in records] == [1, 1]
  qparams, options = quarot.quantize(params, config, configs[0],
                                     progress=False)
  assert options.had_blocks == 1
  assert records[1]["ppl"] == evaluate.perplexity(
      qparams, config, windows, options=options, batch_size=2,
      progress=False)["ppl"]


def test_sweep_rotation_tp_runs_each_rotated_config_per_degree(tp_model):
  windows = hf_models.random_tokens(_TP_CONFIG.vocab_size, 2, 16, seed=7)
  rotated_fp = quarot.QuaRotConfig()
  records = sweep.run_sweep(tp_model, _TP_CONFIG, [rotated_fp], windows,
                            batch_size=2, progress=False, rotation_tp=(2,))
  assert [(r["label"], r["rotation_tp"]) for r in records] == [
      ("W16A16KV16 norot", 1), ("W16A16KV16 rot-hadamard tp2", 2)]
  fp = records[0]["ppl"]
  # The block-diagonal rotation is orthogonal: the float model is unchanged.
  assert records[1]["ppl"] == pytest.approx(fp, rel=1e-5)
  _, options = quarot.quantize(tp_model, _TP_CONFIG, rotated_fp,
                               rotation_tp=2, progress=False)
  assert options.had_blocks == 2  # the online Hadamards match the folding
  # and the row-parallel inputs are quantized per shard, as the packed
  # model on a mesh of 2 does (one scale per token and shard).
  assert options.row_groups == 2
  # Quantized (activations and KV cache: no weight search, for speed), the
  # two transforms give different models; the unrotated one runs once.
  a4kv4 = quarot.QuaRotConfig(a_bits=4, k_bits=4, v_bits=4)
  records = sweep.run_sweep(tp_model, _TP_CONFIG, [a4kv4], windows,
                            batch_size=2, progress=False, rotation_tp=(1, 2))
  assert [(r["label"], r["rotation_tp"]) for r in records] == [
      ("W16A16KV16 norot", 1), ("W16A4KV4 rot-hadamard", 1),
      ("W16A4KV4 rot-hadamard tp2", 2)]
  assert [r["row_groups"] for r in records] == [1, 1, 2]
  tp1, tp2 = records[1]["ppl"], records[2]["ppl"]
  assert abs(tp2 - tp1) > 1e-4 * tp1
  assert abs(tp1 - fp) > 1e-3 * fp


def test_sweep_rotation_tp_skips_what_does_not_fit(tp_model, capsys,
                                                   monkeypatch):
  windows = hf_models.random_tokens(_TP_CONFIG.vocab_size, 2, 16, seed=7)
  records = sweep.run_sweep(
      tp_model, _TP_CONFIG, [quarot.QuaRotConfig(w_bits=8)], windows,
      batch_size=2,
      progress=False, rotation_tp=(5,))
  assert [r["label"] for r in records] == ["W16A16KV16 norot"]
  assert capsys.readouterr().out == (
      "rotation_tp=5 skipped: num_attention_heads=12 must be divisible by"
      " tp=5\n")
  monkeypatch.setattr(quarot, "learn_rotations", None)  # never called
  whip = quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2)
  records = sweep.run_sweep(
      tp_model, _TP_CONFIG, [whip], windows, batch_size=2,
      progress=False, rotation_tp=(2,))
  assert [r["label"] for r in records] == ["W16A16KV16 norot"]
  assert capsys.readouterr().out == (
      "rotation_tp=2 skipped for W16A16KV16 rot-learned-whip2: learned"
      " rotations fold full width only (tp 1)\n")
  with pytest.raises(ValueError, match="distinct positive ints"):
    sweep.run_sweep(tp_model, _TP_CONFIG, [], windows, rotation_tp=(2, 2))


def test_rotation_tp_problem_names_the_size():
  params = jax.eval_shape(
      lambda key: model.init_params(_TP_CONFIG, key), jax.random.key(0))
  assert sweep.rotation_tp_problem(params, _TP_CONFIG, 2) is None
  assert "num_key_value_heads=6" in sweep.rotation_tp_problem(
      params, _TP_CONFIG, 4)
  # Sizes divide by 6, but F / 6 = 6 has no Hadamard matrix (rotate says).
  config = dataclasses.replace(_TP_CONFIG, intermediate_size=36)
  params = jax.eval_shape(lambda key: model.init_params(config, key),
                          jax.random.key(0))
  assert "order n=6" in sweep.rotation_tp_problem(params, config, 6)
  for bad in ((), (0,), (1, 1), (True,), (1.0,)):
    with pytest.raises(ValueError, match="distinct positive ints"):
      sweep.check_rotation_tp(bad)
  assert sweep.check_rotation_tp((1, 3)) == [1, 3]


def test_group_size_divides_every_width():
  config = hf.LlamaConfig(vocab_size=10, hidden_size=576,
                          intermediate_size=1536, num_hidden_layers=1,
                          num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64)
  assert sweep.group_size_for(config) == 64  # 576 = 4.5 * 128
  config = dataclasses.replace(config, hidden_size=4096,
                               intermediate_size=11008,
                               num_attention_heads=32,
                               num_key_value_heads=32, head_dim=128)
  assert sweep.group_size_for(config) == 128


def test_sweep_learns_once_per_rotation_key(tiny, monkeypatch):
  params, config = tiny
  windows = hf_models.random_tokens(config.vocab_size, 2, 16, seed=7)
  calls = []
  learn = quarot.learn_rotations
  monkeypatch.setattr(quarot, "learn_rotations",
                      lambda *a, **k: calls.append(1) or learn(*a, **k))
  whip = quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2,
                             k_bits=8, v_bits=8)
  records = sweep.run_sweep(
      params, config, [whip, dataclasses.replace(whip, a_bits=8)], windows,
      calib_windows=windows, batch_size=2, progress=False)
  assert len(calls) == 1  # the whip loss does not see the bits
  learned = records[1:]
  assert [r["label"] for r in learned] == [
      "W16A16KV8 rot-learned-whip2", "W16A8KV8 rot-learned-whip2"]
  for r in learned:
    assert r["rotate_mode"] == "learned"
    assert r["rotation_objective"] == "whip" and r["rotation_steps"] == 2
    assert r["rotation_batch_size"] is None  # whip has no batches
    assert r["rotation_s"] == learned[0]["rotation_s"] > 0
    assert r["nsamples"] == 2
  assert records[0]["rotation_objective"] is None
  assert records[0]["rotation_s"] is None


def test_sweep_scores_each_config_on_each_text_learning_once(
    tiny, monkeypatch):
  params, config = tiny
  texts = {"enwiki-gensim": hf_models.random_tokens(config.vocab_size, 3, 16,
                                                    seed=7),
           "code-sympy": hf_models.random_tokens(config.vocab_size, 2, 16,
                                                 seed=8)}
  learns, quantizes = [], []
  learn, quantize = quarot.learn_rotations, quarot.quantize
  monkeypatch.setattr(quarot, "learn_rotations",
                      lambda *a, **k: learns.append(1) or learn(*a, **k))
  monkeypatch.setattr(quarot, "quantize",
                      lambda *a, **k: quantizes.append(1) or quantize(*a, **k))
  whip = quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2,
                             k_bits=8, v_bits=8)
  seen = []
  records = sweep.run_sweep(
      params, config, [whip], texts, calib_windows=texts["enwiki-gensim"],
      on_record=seen.append, batch_size=2, progress=False)
  assert len(learns) == 1 and len(quantizes) == 2  # float, whip: once each
  assert seen == records
  assert [(r["label"], r["eval_text"]) for r in records] == [
      ("W16A16KV16 norot", "enwiki-gensim"), ("W16A16KV16 norot", "code-sympy"),
      ("W16A16KV8 rot-learned-whip2", "enwiki-gensim"),
      ("W16A16KV8 rot-learned-whip2", "code-sympy")]
  fp = {r["eval_text"]: r["ppl"] for r in records[:2]}
  assert fp["code-sympy"] == pytest.approx(evaluate.perplexity(
      params, config, texts["code-sympy"], batch_size=2,
      progress=False)["ppl"], rel=1e-6)
  assert fp["enwiki-gensim"] != fp["code-sympy"]
  for r in records:
    assert r["fp_ppl"] == fp[r["eval_text"]]
    assert r["delta_ppl"] == r["ppl"] - fp[r["eval_text"]]
  assert [r["eval_tokens"] for r in records[2:]] == [3 * 15, 2 * 15]
  assert records[2]["rotation_s"] == records[3]["rotation_s"] > 0
  assert records[2]["nsamples"] == records[3]["nsamples"] == 3
  with pytest.raises(ValueError, match="eval_text"):
    sweep.run_sweep(params, config, [], texts, eval_text="code-sympy",
                    progress=False)
  with pytest.raises(ValueError, match="no evaluation"):
    sweep.run_sweep(params, config, [], {}, progress=False)


def test_sweep_learns_rotations_on_their_own_windows(tiny, monkeypatch):
  """GPTQ keeps `calib_windows`; the rotation learns on the other set."""
  params, config = tiny
  gptq_windows = hf_models.random_tokens(config.vocab_size, 2, 16, seed=7)
  rotation_windows = hf_models.random_tokens(config.vocab_size, 2, 16,
                                             seed=9)
  learned_on, quantized_on = [], []
  learn, quantize = quarot.learn_rotations, quarot.quantize
  monkeypatch.setattr(quarot, "learn_rotations", lambda *a, **k: (
      learned_on.append(a[3]) or learn(*a, **k)))
  monkeypatch.setattr(quarot, "quantize", lambda *a, **k: (
      quantized_on.append(a[3]) or quantize(*a, **k)))
  whip = quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2,
                             w_bits=4, w_method="gptq", k_bits=8, v_bits=8)
  hadamard = dataclasses.replace(whip, rotate_mode="hadamard")
  records = sweep.run_sweep(
      params, config, [hadamard, whip], gptq_windows,
      calib_windows=gptq_windows, rotation_calib_windows=rotation_windows,
      rotation_calib_texts=["enwiki-gensim", "code-sympy"], batch_size=2,
      progress=False)
  assert len(learned_on) == 1 and learned_on[0] is rotation_windows
  assert all(w is gptq_windows for w in quantized_on[1:])  # after float
  assert [r["rotation_calib_texts"] for r in records] == [
      None, None, ["enwiki-gensim", "code-sympy"]]
  with pytest.raises(ValueError, match="rotation_calib_texts"):
    sweep.run_sweep(params, config, [], gptq_windows,
                    rotation_calib_texts=["code-sympy"], progress=False)


class _ByteTokenizer:
  """One token per byte."""

  def __call__(self, text, add_special_tokens=True):
    del add_special_tokens
    return {"input_ids": list(text.encode("utf-8"))}


def test_text_windows_score_each_text_and_calibrate_on_enwiki(monkeypatch):
  docs = {"enwiki-gensim": (["e" * 40], ["E" * 40]),  # (calibration, test)
          "code-sympy": (["c" * 40], ["C" * 40])}
  monkeypatch.setattr(data, "text_split", docs.__getitem__)
  evals, calib = sweep.text_windows(
      _ByteTokenizer(), ["code-sympy", "enwiki-gensim"], seqlen=8,
      max_windows=2, nsamples=3)
  assert list(evals) == ["code-sympy", "enwiki-gensim"]
  assert (evals["code-sympy"] == ord("C")).all()
  assert (evals["enwiki-gensim"] == ord("E")).all()
  assert evals["code-sympy"].shape == (2, 8)
  assert calib.shape == (3, 8) and (calib == ord("e")).all()
  one, none = sweep.windows(_ByteTokenizer(), seqlen=8, max_windows=None,
                            nsamples=0, eval_text="code-sympy")
  assert one.shape == (5, 8) and (one == ord("C")).all() and none is None
  with pytest.raises(ValueError, match="code-sympy"):
    sweep.text_windows(_ByteTokenizer(), ["code-sympy", "code-sympy"],
                       seqlen=8, max_windows=2, nsamples=0)
  with pytest.raises(ValueError, match="at least one"):
    sweep.text_windows(_ByteTokenizer(), [], seqlen=8, max_windows=2,
                       nsamples=0)
