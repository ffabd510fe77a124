"""A Flax face for the functional model: the same params pytree, one forward.

`Llama(config, options)` is a `flax.linen.Module` whose variables are
`{"params": params}`, with `params` exactly in `model.py`'s layout (made by
`model.init_params`), and whose `__call__` is `model.forward`. The module
holds no layer of its own: there is one layout and one implementation, and
`Llama(config).apply({"params": p}, x)` is `model.forward(p, x, config)`.

Everything that takes params (`quarot.quantize`, `rotation.*`,
`checkpoint.save_params`/`save_quantized`, `generation.generate`) also takes
the variables as they are (`model.unwrap`) and hands params back wrapped as
they came, so no conversion step sits between the two faces:

  llama = nn.Llama(config)
  variables = llama.init(jax.random.key(0), tokens)
  qvariables, options = quarot.quantize(variables, config, qconfig,
                                        packed=True)
  logits, _ = nn.Llama(config, options).apply(qvariables, tokens)
  print(nn.summary(qvariables))

`summary` is the parameter table in bytes per dtype, for float or packed
params (or their `jax.eval_shape`). This is the only module of the package
that imports Flax; the core never does.
"""

import collections
from typing import Any

from flax import linen
import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax import model
from quarot_jax.config import LlamaConfig


class Llama(linen.Module):
  """The LLaMA-family decoder as a Flax module over `model.forward`.

  `init(rng, tokens)` returns `{"params": model.init_params(config, key,
  dtype=param_dtype)}` (one Flax param per top-level subtree: embed_tokens,
  layers, norm and lm_head when untied), with `key` from the "params" rng
  stream. `apply` passes whatever params it is given (rotated, simulated or
  packed quantized) straight to `model.forward`.

  Attributes:
    config: the model's `LlamaConfig`.
    options: rotation/quantization behaviour (`model.RunOptions`); run
      quantized params with the options `quarot.quantize` returned.
    kernels: which kernels run packed linears and KV4 caches (a
      `kernels.resolve` setting or a `kernels.Kernels`), or None for the
      forward's default.
    param_dtype: dtype of the params `init` creates.
  """

  config: LlamaConfig
  options: model.RunOptions = model.FLOAT
  kernels: Any = None
  param_dtype: Any = jnp.float32

  @linen.compact
  def __call__(self, tokens: jax.Array, cache: Any = None,
               return_hidden: bool = False, last_only: bool = False):
    """Runs `model.forward` on this module's params.

    Args:
      tokens: int32[B, T].
      cache: a `kv_cache.KVCache` (float or packed KV4), or None.
      return_hidden: return the final hidden state [B, T, D] instead of
        logits.
      last_only: logits of the last position only (f32[B, 1, V]).

    Returns:
      (logits f32[B, T, V] (or hidden [B, T, D]), new cache or None), as
      `model.forward`.
    """
    if self.is_initializing():
      initial = model.init_params(self.config, self.make_rng("params"),
                                  dtype=self.param_dtype)
      params = {name: self.param(name, lambda _, tree=tree: tree)
                for name, tree in initial.items()}
    else:
      # Read as stored: rotated and packed params differ from the init
      # shapes, which `self.param` would reject.
      params = self.variables["params"]
    kwargs = {} if self.kernels is None else {"kernels": self.kernels}
    return model.forward(params, tokens, self.config, cache=cache,
                         options=self.options, return_hidden=return_hidden,
                         last_only=last_only, **kwargs)


def _leaf_rows(variables: Any) -> list[tuple[str, tuple[int, ...], str, int]]:
  """(path, shape, dtype name, bytes) of every param leaf, in tree order."""
  params, _ = model.unwrap(variables)
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = tuple(int(d) for d in np.shape(leaf))
    dtype = np.dtype(leaf.dtype)
    rows.append((name, shape, dtype.name,
                 int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
  return rows


def bytes_per_dtype(variables: Any) -> dict[str, int]:
  """Bytes the params take, per dtype name (e.g. {'float32': 3_000_000}).

  Args:
    variables: Flax variables `{"params": params}` or a params pytree;
      arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).

  Returns:
    dtype name -> total bytes of the leaves of that dtype.
  """
  totals = collections.Counter()
  for _, _, dtype, nbytes in _leaf_rows(variables):
    totals[dtype] += nbytes
  return dict(totals)


def _mib(nbytes: int) -> str:
  return f"{nbytes / 2**20:,.2f} MiB"


def summary(variables: Any) -> str:
  """The parameter table: one row per leaf, then bytes per dtype.

  Layers are stacked on the L axis, so a model of any depth is a dozen
  rows; packed linears show `qweight uint8[L, out, in // 2]` and `wscale`.
  Works on `jax.eval_shape` output, so a 70B model's table costs no memory.

  Args:
    variables: Flax variables `{"params": params}` or a params pytree.

  Returns:
    The table as text (print it).
  """
  rows = _leaf_rows(variables)
  header = ("param", "shape", "dtype", "bytes")
  body = [(name, str(list(shape)), dtype, f"{nbytes:,}")
          for name, shape, dtype, nbytes in rows]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(4)]

  def line(cells):
    return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]),
                      cells[2].ljust(widths[2]), cells[3].rjust(widths[3])])

  out = [line(header), "-" * len(line(header))]
  out += [line(r) for r in body]
  out.append("-" * len(line(header)))
  totals = bytes_per_dtype(variables)
  for dtype, nbytes in sorted(totals.items()):
    out.append(f"{dtype}: {nbytes:,} bytes ({_mib(nbytes)})")
  total = sum(totals.values())
  out.append(f"total: {total:,} bytes ({_mib(total)})")
  return "\n".join(out)
