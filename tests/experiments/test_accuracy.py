"""Tests for experiments/accuracy.py's learned sweep rows."""

import pytest

from experiments import accuracy
from quarot_jax.quarot import QuaRotConfig


def test_learned_sweep_rows_objectives_then_hadamard():
  configs = accuracy._learned_sweep(QuaRotConfig(), ["qerror", "whip"],
                                    ["w4a4kv4"])
  assert [(c.rotate_mode, c.rotation_objective if c.rotate_mode == "learned"
           else None, c.a_bits) for c in configs] == [
               ("learned", "qerror", 4), ("learned", "whip", 4),
               ("hadamard", None, 4)]
  assert all(c.w_bits == 4 and c.w_method == "gptq" and c.rotate
             for c in configs)
  both = accuracy._learned_sweep(QuaRotConfig(), ["qerror"],
                                 ["w4a16", "w4a4kv4"])
  assert [c.a_bits for c in both] == [16, 4, 16, 4]


def test_learned_sweep_unknown_row_names_it():
  with pytest.raises(ValueError, match="w8a8"):
    accuracy._learned_sweep(QuaRotConfig(), ["qerror"], ["w8a8"])
