"""The accuracy table of the QuaRot paper as a list of `QuaRotConfig`s."""

import dataclasses
from typing import Sequence

from quarot_jax.quarot import QuaRotConfig


PAPER_ROWS = ("w8a8kv8", "w6a6kv6", "w4a16", "w4a4kv4", "w4a4kv4g", "kv4",
              "kv3", "kv2")


def paper_sweep(group_size: int = 128,
                rows: Sequence[str] | None = None,
                base: QuaRotConfig | None = None) -> list[QuaRotConfig]:
  """The table of the accuracy issue, each config with and without rotation.

  fp; W8A8KV8; W6A6KV6; W4A16 (RTN, GPTQ); W4A4KV4 (RTN, GPTQ, GPTQ with
  weight groups of `group_size`); KV-only 4/3/2 bits.

  Args:
    group_size: weight group size of the grouped GPTQ row (see
      `quarot_jax.sweep.group_size_for`).
    rows: keep only these rows (names of `PAPER_ROWS`; 'w4a16' and
      'w4a4kv4' hold both weight methods, 'w4a4kv4g' the grouped one), in
      the table's order; None: all.
    base: settings every config keeps (clips, seed, GPTQ's, center_keys:
      the flags), except what a row sets (bits, weight method and groups,
      rotation); center_keys only where keys are quantized. None: defaults.

  Returns:
    The float config, then each row unrotated and rotated.

  Raises:
    ValueError: an unknown row name (the message names it and the choices).
  """
  named = [
      ("w8a8kv8", dict(w_bits=8, a_bits=8, k_bits=8, v_bits=8)),
      ("w6a6kv6", dict(w_bits=6, a_bits=6, k_bits=6, v_bits=6)),
      ("w4a16", dict(w_bits=4, a_bits=16, w_method="rtn")),
      ("w4a16", dict(w_bits=4, a_bits=16, w_method="gptq")),
      ("w4a4kv4", dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                       w_method="rtn")),
      ("w4a4kv4", dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                       w_method="gptq")),
      ("w4a4kv4g", dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                        w_method="gptq", w_groupsize=group_size)),
      ("kv4", dict(k_bits=4, v_bits=4)),
      ("kv3", dict(k_bits=3, v_bits=3)),
      ("kv2", dict(k_bits=2, v_bits=2)),
  ]
  unknown = sorted(set(rows or ()) - set(PAPER_ROWS))
  if unknown or (rows is not None and not rows):
    raise ValueError(f"paper rows {','.join(unknown or ['(none)'])}: each"
                     f" must be one of {','.join(PAPER_ROWS)}")
  base = base or QuaRotConfig()
  row_defaults = dict(w_bits=16, a_bits=16, k_bits=16, v_bits=16,
                      w_method="rtn", w_groupsize=None,
                      rotate_mode="hadamard")

  def config(rotate: bool, kw: dict) -> QuaRotConfig:
    fields = {**row_defaults, **kw}
    return dataclasses.replace(
        base, rotate=rotate, **fields,
        center_keys=base.center_keys and fields["k_bits"] < 16)

  configs = [config(False, {})]
  for name, kw in named:
    if rows is not None and name not in rows:
      continue
    for rotate in (False, True):
      configs.append(config(rotate, kw))
  return configs


LEARNED_ROWS = {
    "w4a4kv4": dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_method="gptq"),
    "w4a16": dict(w_bits=4, a_bits=16, k_bits=16, v_bits=16, w_method="gptq"),
}


def learned_sweep(flagged: QuaRotConfig, objectives: list[str],
                  row_names: list[str], *, learn_scales: bool = False,
                  rotation_loss: str = "ce", scale_lr_ratio: float = 1.0
                  ) -> list[QuaRotConfig]:
  """Issue #16's sweep: the GPTQ rows named (keys of `LEARNED_ROWS`) with
  each learned objective, then with the Hadamard.

  Args:
    flagged: the config the flags give (rotation steps, lr, ...).
    objectives: `learned_rotation.OBJECTIVES` to run, in order.
    row_names: e.g. ['w4a4kv4', 'w4a16'].
    learn_scales: the 'e2e' rows also learn channel scales.
    rotation_loss: the 'e2e' rows' loss ('ce' or 'kl').
    scale_lr_ratio: the 'e2e' rows' scales' learning rate over the
      rotations' (with learn_scales).

  Returns:
    One config per (row, objective), then one Hadamard config per row.

  Raises:
    ValueError: an unknown or empty row list (the message names it),
      learn_scales or a loss other than 'ce' without 'e2e' among the
      objectives, or a scale_lr_ratio without learn_scales.
  """
  for flag, given in (("--learn_scales", learn_scales),
                      ("--rotation_loss", rotation_loss != "ce")):
    if given and "e2e" not in objectives:
      raise ValueError(f"{flag} needs e2e among --objectives, got"
                       f" {','.join(objectives)}")
  if scale_lr_ratio != 1 and not learn_scales:
    raise ValueError(f"--scale_lr_ratio={scale_lr_ratio:g} needs"
                     " --learn_scales (it sets the scales' rate)")
  unknown = sorted(set(row_names) - set(LEARNED_ROWS))
  if unknown or not row_names:
    raise ValueError(f"--learned_rows={','.join(row_names)}: each must be"
                     f" one of {sorted(LEARNED_ROWS)}")
  rows = [LEARNED_ROWS[name] for name in row_names]
  learned = [dataclasses.replace(
      flagged, rotate=True, rotate_mode="learned",
      rotation_objective=objective,
      learn_scales=learn_scales and objective == "e2e",
      scale_lr_ratio=(scale_lr_ratio if learn_scales and objective == "e2e"
                      else 1.0),
      rotation_loss=rotation_loss if objective == "e2e" else "ce", **row)
             for row in rows for objective in objectives]
  return learned + [dataclasses.replace(flagged, rotate=True,
                                        rotate_mode="hadamard", **row)
                    for row in rows]
