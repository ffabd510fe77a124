"""The paper's sweep list and the learned-rotation sweep."""

import pytest

from experiments.lab import paper
from quarot_jax.quarot import QuaRotConfig


def test_paper_sweep_pairs_every_row_with_and_without_rotation():
  configs = paper.paper_sweep(64)
  assert len(configs) == 1 + 2 * 10 and len(set(configs)) == len(configs)
  assert configs[0].describe() == "W16A16KV16 norot"
  assert [c.rotate for c in configs[1:]] == [False, True] * 10
  grouped = [c for c in configs if c.w_groupsize]
  assert [c.describe() for c in grouped] == [
      "W4A4KV4 gptq g64 norot", "W4A4KV4 gptq g64 rot-hadamard"]


def test_learned_sweep_rows_objectives_then_hadamard():
  configs = paper.learned_sweep(QuaRotConfig(), ["qerror", "whip"],
                                    ["w4a4kv4"])
  assert [(c.rotate_mode, c.rotation_objective if c.rotate_mode == "learned"
           else None, c.a_bits) for c in configs] == [
               ("learned", "qerror", 4), ("learned", "whip", 4),
               ("hadamard", None, 4)]
  assert all(c.w_bits == 4 and c.w_method == "gptq" and c.rotate
             for c in configs)
  both = paper.learned_sweep(QuaRotConfig(), ["qerror"],
                                 ["w4a16", "w4a4kv4"])
  assert [c.a_bits for c in both] == [16, 4, 16, 4]


def test_learned_sweep_scales_only_the_e2e_rows():
  configs = paper.learned_sweep(QuaRotConfig(), ["whip", "e2e"], ["w4a16"],
                                learn_scales=True)
  assert [c.describe() for c in configs] == [
      "W4A16KV16 gptq rot-learned-whip100",
      "W4A16KV16 gptq rot-learned-e2e100+s", "W4A16KV16 gptq rot-hadamard"]
  with pytest.raises(ValueError, match="--learn_scales needs e2e among"
                     " --objectives, got whip"):
    paper.learned_sweep(QuaRotConfig(), ["whip"], ["w4a16"],
                        learn_scales=True)


def test_learned_sweep_gives_loss_and_scale_lr_to_the_e2e_rows_only():
  flagged = QuaRotConfig()
  configs = paper.learned_sweep(flagged, ["whip", "e2e"], ["w4a16"],
                                learn_scales=True, rotation_loss="kl",
                                scale_lr_ratio=0.1)
  assert [c.describe() for c in configs] == [
      "W4A16KV16 gptq rot-learned-whip100",
      "W4A16KV16 gptq rot-learned-e2e100-kl+s0.1",
      "W4A16KV16 gptq rot-hadamard"]
  with pytest.raises(ValueError, match="--rotation_loss needs e2e among"
                     " --objectives, got whip"):
    paper.learned_sweep(flagged, ["whip"], ["w4a16"], rotation_loss="kl")
  with pytest.raises(ValueError, match="--scale_lr_ratio=0.1 needs"
                     " --learn_scales"):
    paper.learned_sweep(flagged, ["e2e"], ["w4a16"], scale_lr_ratio=0.1)


def test_learned_sweep_unknown_row_names_it():
  with pytest.raises(ValueError, match="w8a8"):
    paper.learned_sweep(QuaRotConfig(), ["qerror"], ["w8a8"])


def test_paper_sweep_keeps_the_rows_named_in_paper_order():
  configs = paper.paper_sweep(64, rows=["w4a4kv4", "w4a16"])
  assert [c.describe() for c in configs] == [
      "W16A16KV16 norot",
      "W4A16KV16 rtn norot", "W4A16KV16 rtn rot-hadamard",
      "W4A16KV16 gptq norot", "W4A16KV16 gptq rot-hadamard",
      "W4A4KV4 rtn norot", "W4A4KV4 rtn rot-hadamard",
      "W4A4KV4 gptq norot", "W4A4KV4 gptq rot-hadamard"]
  kv = paper.paper_sweep(64, rows=["kv3"])
  assert [c.describe() for c in kv] == [
      "W16A16KV16 norot", "W16A16KV3 norot", "W16A16KV3 rot-hadamard"]


def test_paper_sweep_unknown_row_names_it_and_the_choices():
  with pytest.raises(ValueError, match=r"w3a3.*w4a4kv4g"):
    paper.paper_sweep(64, rows=["w3a3"])


def test_paper_sweep_keeps_the_flagged_settings_but_not_their_bits():
  base = QuaRotConfig(center_keys=True, kv_clip=0.8, seed=3, w_bits=4,
                      w_method="gptq", rotate_mode="random")
  configs = paper.paper_sweep(64, rows=["w8a8kv8", "w4a16"], base=base)
  assert [c.describe() for c in configs] == [
      "W16A16KV16 norot",
      "W8A8KV8 rtn norot kc", "W8A8KV8 rtn rot-hadamard kc",
      "W4A16KV16 rtn norot", "W4A16KV16 rtn rot-hadamard",
      "W4A16KV16 gptq norot", "W4A16KV16 gptq rot-hadamard"]
  assert all(c.kv_clip == 0.8 and c.seed == 3 for c in configs)
