"""Which kernels one decode step launches, grouped by the line that made
them (issue #14: measure the structure before the kernels).

Compiles one decode step (`model.forward` on one new token, per-layer
params and cache as `generate` runs them) of a LLaMA preset cut to a few
layers, and prints each launched HLO instruction's kind and the source
line in its metadata, counted per layer. The optimized HLO goes to
`--out_dir` for reading.

Usage on the GPU:
  bash experiments/device/run.sh py experiments.decode_step_kernels \
      --model=llama2-7b --layers=2 --batch=1
"""

import collections
import dataclasses
import os
import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import decode_speed
from experiments.lab import speed
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout

_MODEL = flags.DEFINE_enum("model", "llama2-7b", list(speed.PRESETS),
                           "Shapes.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers compiled.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded.")
_CACHED = flags.DEFINE_integer("cached", 1024, "Cache slots.")
_KERNELS = flags.DEFINE_string("kernels", "auto", "kernels= setting.")
_OUT = flags.DEFINE_string("out_dir", "/tmp", "Where the HLO text goes.")

_OP = re.compile(r'op_name="([^"]+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _frames(hlo_text: str) -> dict[int, str]:
  """Stack frame id -> 'file:line function < caller:line ...' from the
  module's frame tables (innermost first, two library frames at most)."""
  tables, name = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations",
                "StackFrames"):
      name = line
      continue
    row = re.match(r"^(\d+) (.*)$", line) if name else None
    if not row:
      name = None if line.startswith(("HloModule", "ENTRY", "%")) else name
      continue
    tables[name][int(row.group(1))] = row.group(2).strip('"')
  def loc(i):
    fields = dict(kv.split("=") for kv in
                  tables["FileLocations"][i].strip("{}").split())
    file = os.path.basename(tables["FileNames"][int(fields["file_name_id"])])
    fn = tables["FunctionNames"][int(fields["function_name_id"])]
    return f"{file}:{fields['line']} {fn}"
  out = {}
  for i, text in tables["StackFrames"].items():
    chain, j = [], i
    while j and len(chain) < 2:
      fields = dict(kv.split("=") for kv in text.strip("{}").split())
      where = loc(int(fields["file_location_id"]))
      if not where.startswith(("api.py", "<", "decode_step_kernels")):
        chain.append(where)
      parent = int(fields["parent_frame_id"])
      j = parent if parent != j else 0
      text = tables["StackFrames"].get(j, "")
    out[i] = " < ".join(chain)
  return out


def launched(hlo_text: str) -> list[tuple[str, str]]:
  """(kind, where) of every kernel the module launches.

  Args:
    hlo_text: optimized HLO text (`compile().as_text()`).

  Returns:
    One (kind, 'file:line op') pair per launched instruction, in order;
    kinds and the launch rule are `decode_speed.launch_count`'s.
  """
  bodies = set(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", hlo_text))
  frames = _frames(hlo_text)
  out, skip = [], False
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      skip = head.group(1) in bodies and not line.startswith("ENTRY")
      continue
    op = re.search(r"= [^=]*? ([a-z][\w\-]*)\(", line)
    if skip or not op or op.group(1) in decode_speed.FREE_OPS:
      continue
    frame, name = _FRAME.search(line), _OP.search(line)
    where = frames.get(int(frame.group(1)), "?") if frame else "?"
    last = name.group(1).split("/")[-1] if name else "?"
    out.append((op.group(1), f"{last:<22} {where}"))
  return out


def main(argv):
  del argv
  config = dataclasses.replace(speed.PRESETS[_MODEL.value],
                               num_hidden_layers=_LAYERS.value)
  key = jax.random.key(0)
  fparams = model.init_params(config, key, dtype=jnp.bfloat16)
  tok = jnp.zeros((_BATCH.value, 1), jnp.int32)
  for label, params, packed, opts in (
      ("bf16", fparams, False, model.FLOAT),
      ("w4a4kv4", speed.packed_like(fparams, key), True,
       speed.W4A4KV4.run_options(config.head_dim))):
    params = run_layout.unstack_layers(params, fuse=True)  # as generate
    cache = kv_cache.cache_for(config, _BATCH.value, _CACHED.value,
                               dtype=jnp.bfloat16, packed=packed,
                               per_layer=True)
    step = jax.jit(lambda p, c, t, o=opts: model.forward(  # as generate:
        p, t, config, cache=c, options=o, kernels=_KERNELS.value),
        donate_argnums=1)  # the cache updated in place
    text = step.lower(params, cache, tok).compile().as_text()
    with open(os.path.join(_OUT.value, f"decode_step_{label}.hlo"), "w") as f:
      f.write(text)
    kernels = launched(text)
    print(f"\n{label}: {len(kernels)} launches for {_LAYERS.value} layers"
          f" ({_MODEL.value} shapes, batch {_BATCH.value})")
    for (kind, where), n in sorted(collections.Counter(kernels).items(),
                                   key=lambda kv: kv[0][1]):
      print(f"  {n / _LAYERS.value:5.1f}/layer  {kind:<12} {where}")


if __name__ == "__main__":
  app.run(main)
