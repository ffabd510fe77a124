"""The shared CLI flags: names, defaults, parsing, and the config they build."""

from absl import flags
import jax
import pytest

from quarot_jax import cli_flags
from quarot_jax import kernels
from quarot_jax.quarot import QuaRotConfig


def _parse(argv, **defaults):
  registry = flags.FlagValues()
  quant = cli_flags.define_quant_flags(registry, **defaults)
  kern = cli_flags.define_kernels_flag(flag_values=registry)
  registry(["prog", *argv])
  return {k: h.value for k, h in quant.items()}, kern.value


def test_defaults_are_the_config_defaults():
  values, kern = _parse([])
  assert set(values) == set(cli_flags.QUANT_FLAGS)
  assert cli_flags.quarot_config(values) == QuaRotConfig()
  assert values["nsamples"] == 128 and kern == "auto"


def test_flags_build_the_config_they_spell():
  values, kern = _parse(["--w_bits=4", "--a_bits=4", "--k_bits=4",
                         "--v_bits=3", "--w_method=gptq", "--w_groupsize=64",
                         "--norotate", "--a_clip=0.8", "--nsamples=16",
                         "--kernels=xla"])
  want = QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=3,
                      w_method="gptq", w_groupsize=64, rotate=False,
                      a_clip=0.8)
  assert cli_flags.quarot_config(values) == want
  assert values["nsamples"] == 16 and kern == "xla"


def test_caller_defaults_override_the_config_defaults():
  values, _ = _parse(["--a_bits=16"], w_bits=4, a_bits=4, w_method="gptq")
  assert cli_flags.quarot_config(values) == QuaRotConfig(
      w_bits=4, w_method="gptq")


def test_bad_values_are_rejected():
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(["--w_method=awq"])
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(["--kernels=cuda"])
  with pytest.raises(ValueError, match="w_bits=1 must be"):
    cli_flags.quarot_config({"w_bits": 1})
  with pytest.raises(ValueError, match=r"unknown=\['kv_bits'\]"):
    cli_flags.quarot_config({"kv_bits": 4})
  with pytest.raises(ValueError, match=r"unknown=\['gptq'\]"):
    cli_flags.define_quant_flags(flags.FlagValues(), gptq=True)


def test_kernels_flag_offers_every_setting():
  for setting in kernels.SETTINGS:
    assert _parse([f"--kernels={setting}"])[1] == setting


def test_eval_text_flag():
  registry = flags.FlagValues()
  holder = cli_flags.define_eval_text_flag(flag_values=registry)
  registry(["prog"])
  assert holder.value == "enwiki-gensim"
  registry(["prog", "--eval_text=code-sympy"])
  assert holder.value == "code-sympy"
  with pytest.raises(flags.IllegalFlagValueError):
    registry(["prog", "--eval_text=wikitext2"])


def test_learned_rotation_flags():
  values, _ = _parse(["--rotate_mode=learned", "--rotation_objective=e2e",
                      "--rotation_steps=7", "--rotation_lr=0.01"])
  assert cli_flags.quarot_config(values) == QuaRotConfig(
      rotate_mode="learned", rotation_objective="e2e", rotation_steps=7,
      rotation_lr=0.01)
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(["--rotation_objective=spin"])


def test_tp_flag_and_its_mesh():
  registry = flags.FlagValues()
  holder = cli_flags.define_tp_flag(flag_values=registry)
  registry(["prog"])
  assert holder.value == 1 and cli_flags.mesh(holder.value) is None
  registry(["prog", "--tp=2"])
  assert holder.value == 2
  with pytest.raises(flags.IllegalFlagValueError):
    registry(["prog", "--tp=0"])
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"tp={n + 1} needs {n + 1} devices"
                     f" but jax sees {n}"):
    cli_flags.mesh(n + 1)
