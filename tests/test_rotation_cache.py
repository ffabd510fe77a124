"""Learned rotations saved and loaded across sweeps (`rotation_cache`)."""

import dataclasses
import errno
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import hf
from quarot_jax import learned_rotation
from quarot_jax import quarot
from quarot_jax import rotation_cache
from quarot_jax import sweep
from tests import hf_models

_WHIP = quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2,
                            k_bits=8, v_bits=8, seed=3)


@pytest.fixture(scope="module")
def tiny():
  params, config = hf.load_hf(hf_models.tiny_hf_model("smollm")[0])
  windows = hf_models.random_tokens(config.vocab_size, 2, 16, seed=7)
  return params, config, windows


@pytest.fixture
def learns(monkeypatch):
  """Counts `quarot.learn_rotations` calls and keeps what they return."""
  out = []
  learn = quarot.learn_rotations

  def counting(*args, **kwargs):
    out.append(learn(*args, **kwargs))
    return out[-1]

  monkeypatch.setattr(quarot, "learn_rotations", counting)
  return out


def _sweep(tiny, directory, configs=(_WHIP,)):
  params, config, windows = tiny
  return sweep.run_sweep(params, config, list(configs), windows,
                         calib_windows=windows, model_name="tiny",
                         batch_size=2, progress=False,
                         rotations_dir=directory)


def test_second_sweep_loads_the_saved_rotation(tiny, learns, tmp_path):
  _, config, windows = tiny
  first = _sweep(tiny, str(tmp_path))
  assert len(learns) == 1
  path = rotation_cache.path_for(str(tmp_path), _WHIP, model_name="tiny",
                                 calib_windows=windows)
  assert os.listdir(tmp_path) == [os.path.basename(path)]
  assert sorted(os.listdir(path)) == [rotation_cache.META,
                                      rotation_cache.NPZ]
  with open(os.path.join(path, rotation_cache.META)) as f:
    meta = json.load(f)
  assert meta["rotation_objective"] == "whip"
  assert (meta["rotation_steps"], meta["rotation_lr"], meta["seed"]) == (
      2, _WHIP.rotation_lr, 3)
  assert meta["model"] == "tiny" and meta["calib_shape"] == [2, 16]
  assert meta["key"] == repr(quarot.rotation_key(_WHIP))
  assert meta["rotation_s"] > 0

  # The arrays come back bit for bit.
  ident = rotation_cache.identity(quarot.rotation_key(_WHIP),
                                  model_name="tiny", calib_windows=windows)
  loaded, _ = rotation_cache.load(path, config, ident=ident)
  np.testing.assert_array_equal(loaded.r1, learns[0].r1)
  np.testing.assert_array_equal(loaded.r2, learns[0].r2)

  second = _sweep(tiny, str(tmp_path))
  assert len(learns) == 1  # loaded, not learned again
  assert [r["label"] for r in second] == [r["label"] for r in first]
  assert [r["ppl"] for r in second] == [r["ppl"] for r in first]
  assert first[1]["rotation_loaded"] is False
  assert second[1]["rotation_loaded"] is True
  assert second[1]["rotation_s"] == first[1]["rotation_s"] > 0
  assert first[0]["rotation_loaded"] is None  # the float row learns nothing


def test_learn_rotations_then_sweep_is_the_two_call_split(
    tiny, learns, tmp_path):
  params, config, windows = tiny
  other = quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2,
                              k_bits=8, v_bits=8, seed=4)
  configs = [_WHIP, quarot.QuaRotConfig(w_bits=8), other,
             quarot.QuaRotConfig(rotate_mode="learned", rotation_steps=2,
                                 a_bits=8, k_bits=8, v_bits=8, seed=3)]
  rows = sweep.learn_rotations(params, config, configs, windows,
                               rotations_dir=str(tmp_path),
                               model_name="tiny", progress=False)
  assert len(learns) == 2  # whip sees no bits: seeds 3 and 4
  assert [r["label"] for r in rows] == [_WHIP.describe(), other.describe()]
  assert [r["rotation_loaded"] for r in rows] == [False, False]
  assert all(os.path.isdir(r["path"]) for r in rows)
  again = sweep.learn_rotations(params, config, configs, windows,
                                rotations_dir=str(tmp_path),
                                model_name="tiny", progress=False)
  assert len(learns) == 2
  assert [r["rotation_loaded"] for r in again] == [True, True]
  # Other calibration windows are another rotation.
  assert rotation_cache.path_for(
      str(tmp_path), _WHIP, model_name="tiny",
      calib_windows=windows[:1]) != rows[0]["path"]
  with pytest.raises(ValueError, match="learns rotations"):
    sweep.learn_rotations(params, config, [configs[1]], windows,
                          rotations_dir=str(tmp_path), progress=False)


def _rotations(config):
  return learned_rotation.initial_rotations(
      config, jax.random.key(0))


def test_a_failed_write_leaves_no_entry(tiny, tmp_path, monkeypatch):
  _, config, windows = tiny
  ident = rotation_cache.identity(("k",), model_name="tiny",
                                  calib_windows=windows)
  path = rotation_cache.entry_path(str(tmp_path), ident)
  savez = np.savez

  def half_then_full_disk(file, **arrays):
    with open(file, "wb") as f:
      f.write(b"PK\x03\x04half")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez", half_then_full_disk)
  with pytest.raises(OSError, match="no space left.*was not written"):
    rotation_cache.save(path, _rotations(config), ident=ident,
                        qconfig=_WHIP, rotation_s=1.0)
  assert os.listdir(tmp_path) == []
  assert rotation_cache.load(path, config, ident=ident) is None

  # A killed write (a dead process's temp sibling) is cleaned by the next.
  stale = tmp_path / f".{os.path.basename(path)}.tmp-99999999-abcd"
  stale.mkdir()
  (stale / rotation_cache.NPZ).write_bytes(b"PK")
  monkeypatch.setattr(np, "savez", savez)
  rotation_cache.save(path, _rotations(config), ident=ident, qconfig=_WHIP,
                      rotation_s=1.0)
  assert os.listdir(tmp_path) == [os.path.basename(path)]
  loaded, meta = rotation_cache.load(path, config, ident=ident)
  assert meta["rotation_s"] == 1.0
  np.testing.assert_array_equal(loaded.r1, _rotations(config).r1)


def test_wrong_shapes_or_changed_file_name_the_file(tiny, tmp_path):
  _, config, windows = tiny
  ident = rotation_cache.identity(quarot.rotation_key(_WHIP),
                                  model_name="tiny", calib_windows=windows)
  path = rotation_cache.path_for(str(tmp_path), _WHIP, model_name="tiny",
                                 calib_windows=windows)
  d = config.hidden_size
  wrong = learned_rotation.Rotations(r1=jnp.eye(d + 1),
                                     r2=_rotations(config).r2)
  rotation_cache.save(path, wrong, ident=ident, qconfig=_WHIP,
                      rotation_s=1.0)
  npz = os.path.join(path, rotation_cache.NPZ)
  with pytest.raises(ValueError, match=re.escape(repr(npz)) + ".*"
                     + re.escape(f"({d + 1}, {d + 1})")):
    _sweep(tiny, str(tmp_path))
  with open(npz, "ab") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match=re.escape(repr(npz)) + " has sha256"):
    rotation_cache.load(path, config, ident=ident)
  with pytest.raises(ValueError, match="was saved for"):
    rotation_cache.load(path, config, ident={**ident, "model": "other"})


def test_paused_learning_resumes_beside_the_entry(tiny, tmp_path):
  """With a time budget, learn_or_load saves the learning state beside the
  entry it will write and resumes it on the next call; the entry appears
  only when learning ends, and the state is then gone."""
  params, config, windows = tiny
  qconfig = dataclasses.replace(_WHIP, rotation_steps=3)
  directory = str(tmp_path / "new")  # made by the first save
  kw = dict(directory=directory, model_name="tiny", progress=False,
            time_budget_s=0.0)
  path = rotation_cache.path_for(directory, qconfig, model_name="tiny",
                                 calib_windows=windows)
  for step in (1, 2):
    with pytest.raises(learned_rotation.LearningPaused) as paused:
      rotation_cache.learn_or_load(params, config, qconfig, windows, **kw)
    assert paused.value.step == step
    assert os.path.exists(paused.value.path)
    assert not os.path.exists(path)
  rotations, seconds, loaded = rotation_cache.learn_or_load(
      params, config, qconfig, windows, **kw)
  assert not loaded and seconds > 0
  assert os.listdir(directory) == [os.path.basename(path)]
  want = quarot.learn_rotations(params, config, qconfig, windows,
                                progress=False)
  np.testing.assert_array_equal(np.asarray(rotations.r1), np.asarray(want.r1))
  np.testing.assert_array_equal(np.asarray(rotations.r2), np.asarray(want.r2))


def test_learn_rotations_in_parts_until_done(tiny, tmp_path):
  """sweep.learn_rotations with a spent budget pauses each config after a
  step; repeating the call finishes them all (the --learn_only loop)."""
  params, config, windows = tiny
  configs = [dataclasses.replace(_WHIP, rotation_steps=2),
             dataclasses.replace(_WHIP, rotation_steps=2, seed=4)]
  calls = 0
  while True:
    calls += 1
    try:
      rows = sweep.learn_rotations(params, config, configs, windows,
                                   rotations_dir=str(tmp_path),
                                   model_name="tiny", progress=False,
                                   time_budget_s=0.0)
      break
    except learned_rotation.LearningPaused:
      assert calls < 10
  assert calls == 3  # a pause per config, then both done (one loaded)
  assert [r["rotation_loaded"] for r in rows] == [True, False]
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".npz")]


def test_learn_rotations_budget_counts_from_started(tiny, tmp_path):
  """The budget counts from `started` (the CLI passes its own start, so
  loading the model counts): a budget already spent by then pauses after
  the first step, where the same budget counted from the call would not."""
  params, config, windows = tiny
  configs = [dataclasses.replace(_WHIP, rotation_steps=2)]
  kw = dict(rotations_dir=str(tmp_path), model_name="tiny", progress=False,
            time_budget_s=60.0)
  with pytest.raises(learned_rotation.LearningPaused) as paused:
    sweep.learn_rotations(params, config, configs, windows,
                          started=time.time() - 120.0, **kw)
  assert paused.value.step == 1
  rows = sweep.learn_rotations(params, config, configs, windows, **kw)
  assert [r["rotation_loaded"] for r in rows] == [False]


def test_learned_scales_are_saved_and_loaded(tiny, tmp_path):
  params, config, windows = tiny
  qconfig = quarot.QuaRotConfig(rotate_mode="learned",
                                rotation_objective="e2e", rotation_steps=1,
                                rotation_lr=0.05, learn_scales=True)
  learned, _, loaded = rotation_cache.learn_or_load(
      params, config, qconfig, windows, directory=str(tmp_path),
      model_name="tiny", progress=False)
  assert not loaded and learned.scales.shape == (
      config.num_hidden_layers, 2, config.hidden_size)
  again, _, loaded = rotation_cache.learn_or_load(
      params, config, qconfig, windows, directory=str(tmp_path),
      model_name="tiny", progress=False)
  assert loaded
  np.testing.assert_array_equal(again.scales, learned.scales)
  np.testing.assert_array_equal(again.r1, learned.r1)
  path = rotation_cache.path_for(str(tmp_path), qconfig, model_name="tiny",
                                 calib_windows=windows)
  with open(os.path.join(path, rotation_cache.META)) as f:
    assert json.load(f)["learn_scales"] is True
