"""Compiles the Mosaic W4A4 wt kernel per-channel and grouped (overlap on/off)
so MOSAIC_GPU_DUMP_PTXAS / _PTX show what ptxas made of each (wgmma
serialization warnings, registers, spills, instructions per K step). Lab
probe for issue 15:

  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=DIR \
    bash experiments/device/run.sh py experiments.lab.probe_grouped_sass
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.w4a4_matmul import mosaic_gpu as mg


def main():
  m, k, n, g = 2048, 4096, 4096, 128
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.randint(kx, (m, k), -8, 8, jnp.int8)
  wq = jax.random.randint(kw, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  sx = jnp.ones((m, k // g), jnp.float32)
  sw = jnp.ones((n, k // g), jnp.float32)
  base = mg.default_w4a4_mosaic_wt_grouped_config(g)
  for name, cfg in [("grouped_overlap", base),
                    ("grouped_serial",
                     dataclasses.replace(base, group_overlap=False))]:
    print("=====", name, cfg, flush=True)
    y = jax.jit(lambda *a, cfg=cfg: mg.w4a4_matmul_mosaic_wt(*a, config=cfg))(
        x, wq, sx, sw)
    y.block_until_ready()
  print("===== per_channel", flush=True)
  jax.jit(mg.w4a4_matmul_mosaic_wt)(x, wq, sx[:, 0], sw[:, 0]).block_until_ready()


if __name__ == "__main__":
  main()
