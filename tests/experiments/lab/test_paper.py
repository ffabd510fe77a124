"""The paper's sweep list."""

from experiments.lab import paper


def test_paper_sweep_pairs_every_row_with_and_without_rotation():
  configs = paper.paper_sweep(64)
  assert len(configs) == 1 + 2 * 10 and len(set(configs)) == len(configs)
  assert configs[0].describe() == "W16A16KV16 norot"
  assert [c.rotate for c in configs[1:]] == [False, True] * 10
  grouped = [c for c in configs if c.w_groupsize]
  assert [c.describe() for c in grouped] == [
      "W4A4KV4 gptq g64 norot", "W4A4KV4 gptq g64 rot-hadamard"]
