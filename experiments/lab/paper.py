"""The accuracy table of the QuaRot paper as a list of `QuaRotConfig`s."""

from quarot_jax.quarot import QuaRotConfig


def paper_sweep(group_size: int = 128) -> list[QuaRotConfig]:
  """The table of the accuracy issue, each config with and without rotation.

  fp; W8A8KV8; W6A6KV6; W4A16 (RTN, GPTQ); W4A4KV4 (RTN, GPTQ, GPTQ with
  weight groups of `group_size`); KV-only 4/3/2 bits.

  Args:
    group_size: weight group size of the grouped GPTQ row (see
      `quarot_jax.sweep.group_size_for`).

  Returns:
    The float config, then each row unrotated and rotated.
  """
  base = [
      dict(w_bits=8, a_bits=8, k_bits=8, v_bits=8),
      dict(w_bits=6, a_bits=6, k_bits=6, v_bits=6),
      dict(w_bits=4, a_bits=16, w_method="rtn"),
      dict(w_bits=4, a_bits=16, w_method="gptq"),
      dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="rtn"),
      dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq"),
      dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq",
           w_groupsize=group_size),
      dict(k_bits=4, v_bits=4),
      dict(k_bits=3, v_bits=3),
      dict(k_bits=2, v_bits=2),
  ]
  configs = [QuaRotConfig(rotate=False)]
  for kw in base:
    for rotate in (False, True):
      configs.append(QuaRotConfig(rotate=rotate, **kw))
  return configs
