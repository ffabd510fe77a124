"""Learned rotations saved to a directory, so later runs load, not relearn.

Learning R1/R2 (`quarot.learn_rotations`) can outlast one device call, so a
sweep can learn in one process and quantize and evaluate in the next. Each
saved rotation is a directory `DIR/rot-<hash>/` holding

* `rotations.npz`: `r1` f32[D, D] and `r2` f32[L, H, H] (numpy, no pickle);
* `rotation.json`: what identifies it (`quarot.rotation_key`'s repr, the
  model name, the calibration windows' shape and SHA-256), the key's fields
  (objective, steps, lr, seed, bits, clips), `rotation_s` (seconds spent
  learning it, which records of a loaded rotation still report), the array
  shapes and the npz's SHA-256.

`<hash>` is the SHA-256 of the identity, so the same config key on the same
model and calibration windows finds its rotation and anything else learns
anew. The directory is written under a temp name and renamed into place
(`atomic`), so a killed write leaves no half entry (its temp sibling is
removed by the next write of that entry).
"""

import datetime
import hashlib
import json
import os
import shutil
import time
from typing import Any, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax import atomic
from quarot_jax import learned_rotation
from quarot_jax import quarot
from quarot_jax.config import LlamaConfig
from quarot_jax.quarot import QuaRotConfig

NPZ = "rotations.npz"
META = "rotation.json"
_FORMAT = 1


def identity(key: Hashable, *, model_name: str,
             calib_windows: np.ndarray | None) -> dict[str, Any]:
  """What a saved rotation was learned from (hashed into its name).

  Args:
    key: `quarot.rotation_key` of the config.
    model_name: the model's name (`models.load_model`).
    calib_windows: int32[n, T] calibration windows it learns on.

  Returns:
    JSON-able {'format', 'key' (its repr), 'model', 'calib_shape',
    'calib_sha256'}.
  """
  if calib_windows is None:
    shape, digest = None, None
  else:
    calib = np.ascontiguousarray(calib_windows, np.int32)
    shape, digest = list(calib.shape), hashlib.sha256(calib).hexdigest()
  return {"format": _FORMAT, "key": repr(key), "model": model_name,
          "calib_shape": shape, "calib_sha256": digest}


def entry_path(directory: str, ident: dict[str, Any]) -> str:
  """`directory/rot-<first 16 hex of the identity's SHA-256>`."""
  text = json.dumps(ident, sort_keys=True)
  return os.path.join(
      os.path.abspath(directory),
      f"rot-{hashlib.sha256(text.encode()).hexdigest()[:16]}")


def partial_path(path: str) -> str:
  """The learning state of the entry at `path`, while it is being learned
  (a sibling file, so the entry itself appears only when complete)."""
  return path + ".partial.npz"


def path_for(directory: str, qconfig: QuaRotConfig, *, model_name: str,
             calib_windows: np.ndarray | None) -> str:
  """Where the rotations of `qconfig` learned on these windows are saved."""
  return entry_path(directory, identity(
      quarot.rotation_key(qconfig), model_name=model_name,
      calib_windows=calib_windows))


def _key_fields(qconfig: QuaRotConfig) -> dict[str, Any]:
  return {"rotation_objective": qconfig.rotation_objective,
          "rotation_steps": qconfig.rotation_steps,
          "rotation_lr": qconfig.rotation_lr,
          "rotation_batch_size": qconfig.rotation_batch_size,
          "seed": qconfig.seed, "learn_scales": qconfig.learn_scales,
          "scale_lr_ratio": qconfig.scale_lr_ratio,
          "rotation_loss": qconfig.rotation_loss,
          "w_bits": qconfig.w_bits, "w_method": qconfig.w_method,
          "a_bits": qconfig.a_bits, "k_bits": qconfig.k_bits,
          "v_bits": qconfig.v_bits, "a_clip": qconfig.a_clip,
          "kv_clip": qconfig.kv_clip, "label": qconfig.describe()}


def save(path: str, rotations: learned_rotation.Rotations, *,
         ident: dict[str, Any], qconfig: QuaRotConfig,
         rotation_s: float) -> None:
  """Writes one entry at `path` (`entry_path`), all at once.

  Args:
    path: the entry directory; an existing one is replaced.
    rotations: the learned R1 f32[D, D] and R2 f32[L, H, H] (and any
      scales f32[L, 2, D]).
    ident: `identity(...)` of the rotation.
    qconfig: a config it was learned for (its key's fields are recorded).
    rotation_s: seconds spent learning it.

  Raises:
    OSError: the write failed (a full disk says so); nothing is left at
      `path` unless an older entry was there.
  """
  arrays = {"r1": np.asarray(rotations.r1, np.float32),
            "r2": np.asarray(rotations.r2, np.float32)}
  if rotations.scales is not None:
    arrays["scales"] = np.asarray(rotations.scales, np.float32)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.check_out_dir(path, overwrite=True, what="rotation entry")
  tmp = atomic.make_temp_dir(path)
  try:
    np.savez(os.path.join(tmp, NPZ), **arrays)
    meta = {**ident, **_key_fields(qconfig),
            "rotation_s": float(rotation_s),
            "shapes": {k: list(a.shape) for k, a in arrays.items()},
            "npz_sha256": atomic.file_sha256(os.path.join(tmp, NPZ)),
            "date": datetime.date.today().isoformat()}
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    atomic.commit(tmp, path)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and atomic.is_disk_full(e):
      raise atomic.disk_full_error(path) from e
    raise


def expected_shapes(config: LlamaConfig, *, scales: bool = False
                    ) -> dict[str, tuple[int, ...]]:
  """The shapes of R1 [D, D], R2 [L, H, H] and, with `scales`, the
  scales [L, 2, D] for `config`."""
  d, h, n = config.hidden_size, config.head_dim, config.num_hidden_layers
  shapes = {"r1": (d, d), "r2": (n, h, h)}
  if scales:
    shapes["scales"] = (n, 2, d)
  return shapes


def load(path: str, config: LlamaConfig, *, ident: dict[str, Any]
         ) -> tuple[learned_rotation.Rotations, dict[str, Any]] | None:
  """Reads the entry at `path`, or None if there is none.

  Args:
    path: the entry directory (`entry_path`).
    config: the model the rotations must fit.
    ident: the `identity(...)` expected (guards against hash collisions).

  Returns:
    (rotations, the entry's JSON fields), or None.

  Raises:
    ValueError: the entry is for another identity, its npz changed since
      it was written, or its arrays do not have `config`'s shapes; the
      message names the file.
  """
  npz, meta_path = os.path.join(path, NPZ), os.path.join(path, META)
  if not os.path.isdir(path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  stored = {k: meta.get(k) for k in ident}
  if stored != ident:
    raise ValueError(f"{meta_path!r} was saved for {stored}, not {ident}")
  digest = atomic.file_sha256(npz)
  if digest != meta["npz_sha256"]:
    raise ValueError(f"{npz!r} has sha256 {digest[:16]}…, saved as"
                     f" {meta['npz_sha256'][:16]}…; delete {path!r} to"
                     " learn it again")
  with np.load(npz, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  want = expected_shapes(config, scales="scales" in arrays)
  got = {k: tuple(a.shape) for k, a in arrays.items()}
  if got != want:
    raise ValueError(f"{npz!r} holds rotations of shapes {got}, but the"
                     f" model needs {want}")
  scales = arrays.get("scales")
  return (learned_rotation.Rotations(
      r1=jnp.asarray(arrays["r1"]), r2=jnp.asarray(arrays["r2"]),
      scales=None if scales is None else jnp.asarray(scales)), meta)


def learn_or_load(params: Any, config: LlamaConfig, qconfig: QuaRotConfig,
                  calib_windows: np.ndarray | None, *,
                  directory: str | None, model_name: str,
                  progress: bool = True, time_budget_s: float | None = None
                  ) -> tuple[learned_rotation.Rotations, float, bool]:
  """The rotations of a learned config, from `directory` or learned now.

  With a `directory`, learning saves its state beside the entry
  (`partial_path`, every minute), so a run that is killed or spends
  `time_budget_s` resumes there on the next call.

  Args:
    params: float params.
    config: the model config.
    qconfig: a config with `quarot.rotation_key` not None.
    calib_windows: int32[n, T] calibration windows.
    directory: where rotations are saved (None: learn, save nothing).
    model_name: the model's name, part of the identity.
    progress: show progress bars.
    time_budget_s: with a `directory`, pause learning after this many
      seconds of training (`learned_rotation.LearningPaused`).

  Returns:
    (rotations, seconds spent learning them (when loaded: as saved; when
    resumed: the earlier runs' training seconds included), whether they
    were loaded).

  Raises:
    ValueError: a saved entry is corrupt or does not fit (`load`), the
      config learns no rotations, or `time_budget_s` without a directory.
    learned_rotation.LearningPaused: the time budget was spent.
  """
  if time_budget_s is not None and directory is None:
    raise ValueError("time_budget_s needs a directory to save the learning"
                     " state in")
  key = quarot.rotation_key(qconfig)
  if key is None:
    raise ValueError(f"{qconfig.describe()!r} learns no rotations")
  ident = identity(key, model_name=model_name, calib_windows=calib_windows)
  path = None if directory is None else entry_path(directory, ident)
  if path is not None:
    found = load(path, config, ident=ident)
    if found is not None:
      if progress:
        print(f"rotations of {qconfig.describe()} loaded from {path}"
              f" (learned in {found[1]['rotation_s']:.1f} s)", flush=True)
      return found[0], float(found[1]["rotation_s"]), True
  partial = None if path is None else partial_path(path)
  before = learned_rotation.resumed_seconds(partial)
  start = time.time()
  rotations = quarot.learn_rotations(params, config, qconfig, calib_windows,
                                     progress=progress, resume=partial,
                                     time_budget_s=time_budget_s)
  jax.block_until_ready(rotations)
  rotation_s = before + time.time() - start
  if path is not None:
    save(path, rotations, ident=ident, qconfig=qconfig,
         rotation_s=rotation_s)
    if progress:
      print(f"rotations of {qconfig.describe()} saved to {path}", flush=True)
  return rotations, rotation_s, False
