"""Probe for #14: split-K partial sums reduced inside a thread-block cluster.

The decode matmul splits K over up to 8 programs per 64-row weight tile and
leaves f32[split, N, Mp] partial sums to an XLA epilogue (sum, scales,
transpose, cast): one more launch after each of a layer's four matmuls
(~6.5 us a layer of the ~73, BENCHMARKS.md). On Hopper the programs of one
tile can form a cluster: programs 1..S-1 store their accumulators into
program 0's shared memory (`plgpu.async_store_smem`, distributed shared
memory), and program 0 sums them, applies the scales and writes y itself.

This probe asks the H200 whether that works with jax's Mosaic GPU today,
before the decode matmul is rebuilt on it. Each variant is compiled and
checked against plain jnp on its own (a failure prints its error and the
next runs):
  * 'slots': one shared-memory slot and barrier per peer, program 0 sums.
  * 'atomic': peers add into one slot (`atomic="add"`) after a cluster
    barrier says program 0 has written its own partial there.
  * 'scaled': 'slots' plus the epilogue, y[n, m] = acc * s_w[n] * s_x[m]
    in bf16, stored [64, Mp] (the XLA epilogue would still transpose).
  * 'scaled_t': the same, stored transposed as y[m, n] through a
    transposed view of the output.
Timing (device time, CUPTI): each kernel against the XLA fusion that
reduces the same partials.

Usage on the GPU:
  bash experiments/device/run.sh py experiments.probe_cluster_reduce
"""

import functools
import traceback

from absl import app
from absl import flags
import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from experiments.lab import benchmarking

_TILES = flags.DEFINE_integer("tiles", 64, "64-row tiles (clusters).")
_SPLITS = flags.DEFINE_list("splits", ["2", "8"], "Programs per cluster.")
_MP = flags.DEFINE_list("mp", ["8", "16"], "Padded token columns.")
_ROWS = 64


def _transforms(mp: int):
  swizzle = plgpu.find_swizzle(32 * mp, "slot")
  return (plgpu.TilingTransform((8, swizzle * 8 // 32)),
          plgpu.SwizzleTransform(swizzle))


def _partial(x_gmem, gi, si):
  return plgpu.load(x_gmem.at[gi, si], (), layout=plgpu.Layout.WGMMA,
                    optimized=False)


def _gather(acc, si, slots, barriers, splits):
  """Program 0's sum of all partials (None on the other programs)."""
  @pl.when(si != 0)
  def _():
    plgpu.async_store_smem(acc, slots.at[si - 1], barriers.at[si - 1],
                           cluster_idx=0, cluster_dim="s")

  def total():
    out = acc
    for j in range(splits - 1):
      plgpu.barrier_wait(barriers.at[j])
      out = out + plgpu.load(slots.at[j], (), layout=plgpu.Layout.WGMMA)
    return out
  return total


def _slots_kernel(x_gmem, o_gmem, slots, barriers, *, splits):
  gi, si = lax.axis_index("g"), lax.axis_index("s")
  total = _gather(_partial(x_gmem, gi, si), si, slots, barriers, splits)

  @pl.when(si == 0)
  def _():
    o_gmem[gi] = total()


def _atomic_kernel(x_gmem, o_gmem, slot, ready, stored, *, splits):
  gi, si = lax.axis_index("g"), lax.axis_index("s")
  acc = _partial(x_gmem, gi, si)

  @pl.when(si == 0)
  def _():
    slot[...] = acc
    plgpu.commit_smem()
  plgpu.barrier_arrive(ready)  # everyone: program 0's slot holds its part
  plgpu.barrier_wait(ready)

  @pl.when(si != 0)
  def _():
    plgpu.async_store_smem(acc, slot, stored.at[si - 1], cluster_idx=0,
                           cluster_dim="s", atomic="add")

  @pl.when(si == 0)
  def _():
    for j in range(splits - 1):
      plgpu.barrier_wait(stored.at[j])
    o_gmem[gi] = plgpu.load(slot, (), layout=plgpu.Layout.WGMMA)


def _scaled(acc, sw_gmem, sx_gmem, gi):
  """bf16 acc * s_w[rows of tile gi] (per row) * s_x (per column)."""
  sw = plgpu.load(sw_gmem.at[pl.ds(gi * _ROWS, _ROWS)], (),
                  layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
  sx = plgpu.load(sx_gmem, (), layout=plgpu.Layout.WGMMA.reduce(0),
                  optimized=False)
  return (acc * lax.broadcast_in_dim(sw, acc.shape, [0])
          * lax.broadcast_in_dim(sx, acc.shape, [1])).astype(jnp.bfloat16)


def _scaled_smem_t_kernel(x_gmem, sw_gmem, sx_gmem, o_gmem, slots, barriers,
                          o_smem, *, splits):
  """'scaled' stored transposed through shared memory, then TMA."""
  gi, si = lax.axis_index("g"), lax.axis_index("s")
  total = _gather(_partial(x_gmem, gi, si), si, slots, barriers, splits)

  @pl.when(si == 0)
  def _():
    y = _scaled(total(), sw_gmem, sx_gmem, gi)
    plgpu.transpose_ref(o_smem, (1, 0))[...] = y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, pl.ds(gi * _ROWS, _ROWS)])
    plgpu.wait_smem_to_gmem(0)


def _scaled_kernel(x_gmem, sw_gmem, sx_gmem, o_gmem, slots, barriers, *,
                   splits, transposed):
  gi, si = lax.axis_index("g"), lax.axis_index("s")
  total = _gather(_partial(x_gmem, gi, si), si, slots, barriers, splits)

  @pl.when(si == 0)
  def _():
    y = _scaled(total(), sw_gmem, sx_gmem, gi)
    if transposed:  # o_gmem: bf16[Mp, N]
      view = plgpu.transpose_ref(o_gmem.at[:, pl.ds(gi * _ROWS, _ROWS)],
                                 (1, 0))
      view[...] = y
    else:  # o_gmem: bf16[N, Mp]
      o_gmem[pl.ds(gi * _ROWS, _ROWS)] = y


def _call(body, out_type, scratch, tiles, splits):
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                      grid=(tiles,), grid_names=("g",), cluster=(splits,),
                      cluster_names=("s",), kernel_name="cluster_reduce")


def _variants(tiles, splits, mp):
  """name -> (kernel fn of (x, s_w, s_x), reference fn of the same)."""
  n = tiles * _ROWS
  tf = _transforms(mp)
  slots = plgpu.SMEM((splits - 1, _ROWS, mp), jnp.float32, transforms=tf)
  peer_barriers = plgpu.Barrier(num_arrivals=1, num_barriers=splits - 1)
  sums = jax.ShapeDtypeStruct((tiles, _ROWS, mp), jnp.float32)

  def ref_sum(x, sw, sx):
    del sw, sx
    return x.sum(axis=1)

  def ref_scaled(x, sw, sx, transposed):
    y = (x.sum(axis=1).reshape(n, mp) * sw[:, None] * sx[None, :]
         ).astype(jnp.bfloat16)
    return y.T if transposed else y

  slots_call = _call(functools.partial(_slots_kernel, splits=splits), sums,
                     [slots, peer_barriers], tiles, splits)
  atomic_call = _call(
      functools.partial(_atomic_kernel, splits=splits), sums,
      [plgpu.SMEM((_ROWS, mp), jnp.float32, transforms=tf),
       plgpu.ClusterBarrier(collective_axes=("s",)), peer_barriers],
      tiles, splits)
  atomic_i32_call = _call(
      functools.partial(_atomic_kernel, splits=splits),
      jax.ShapeDtypeStruct((tiles, _ROWS, mp), jnp.int32),
      [plgpu.SMEM((_ROWS, mp), jnp.int32, transforms=tf),
       plgpu.ClusterBarrier(collective_axes=("s",)), peer_barriers],
      tiles, splits)
  smem_t_call = _call(
      functools.partial(_scaled_smem_t_kernel, splits=splits),
      jax.ShapeDtypeStruct((mp, n), jnp.bfloat16),
      [slots, peer_barriers, plgpu.SMEM((mp, _ROWS), jnp.bfloat16)],
      tiles, splits)
  out = {
      "slots": (lambda x, sw, sx: slots_call(x), ref_sum),
      "atomic": (lambda x, sw, sx: atomic_call(x), ref_sum),
      # The int8 MMA's accumulators are int32.
      "atomic_i32": (lambda x, sw, sx: atomic_i32_call(x.astype(jnp.int32)),
                     lambda x, sw, sx: x.astype(jnp.int32).sum(axis=1)),
      "scaled_smem_t": (smem_t_call,
                        lambda x, sw, sx: ref_scaled(x, sw, sx, True)),
  }
  for name, transposed in (("scaled", False), ("scaled_t", True)):
    call = _call(
        functools.partial(_scaled_kernel, splits=splits,
                          transposed=transposed),
        jax.ShapeDtypeStruct((mp, n) if transposed else (n, mp),
                             jnp.bfloat16),
        [slots, peer_barriers], tiles, splits)
    out[name] = (call, functools.partial(ref_scaled, transposed=transposed))
  return out


def main(argv):
  del argv
  tiles = _TILES.value
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for splits in map(int, _SPLITS.value):
    for mp in map(int, _MP.value):
      keys = jax.random.split(jax.random.key(splits * 100 + mp), 3)
      # Integer-valued partials: sums are exact in any order.
      x = jax.random.randint(keys[0], (tiles, splits, _ROWS, mp), -2000,
                             2000).astype(jnp.float32)
      sw = jax.random.uniform(keys[1], (tiles * _ROWS,), jnp.float32)
      sx = jax.random.uniform(keys[2], (mp,), jnp.float32)
      try:
        variants = _variants(tiles, splits, mp)
      except Exception as e:  # pylint: disable=broad-except
        print(f"S={splits} Mp={mp}: building the kernels FAILED: {e}")
        continue
      for name, (fn, ref) in variants.items():
        case = f"S={splits} Mp={mp} {name:<9}"
        try:
          got = jax.jit(fn)(x, sw, sx)
          want = jax.jit(ref)(x, sw, sx)
          err = float(jnp.max(jnp.abs(got.astype(jnp.float32)
                                      - want.astype(jnp.float32))))
          ours = benchmarking.device_ms(jax.jit(fn), x, sw, sx)
          xla = benchmarking.device_ms(jax.jit(ref), x, sw, sx)
          print(f"{case} max|err| {err:.3g}  device ms: ours {ours}, XLA"
                f" reduce {xla}", flush=True)
        except Exception as e:  # pylint: disable=broad-except
          lines = traceback.format_exception_only(type(e), e)
          print(f"{case} FAILED: {''.join(lines).strip()[:600]}",
                flush=True)


if __name__ == "__main__":
  app.run(main)
