"""W4A4 matmul: packed int4 activations times packed int4 weights.

One op, its backends side by side: `reference` (plain jnp, XLA's int8 dot),
`triton` (Pallas Triton, any GPU and interpret mode), `mosaic_gpu` (Pallas
Mosaic GPU, Hopper wgmma), and `api.w4a4_matmul`, which runs the one it is
told to.
"""
