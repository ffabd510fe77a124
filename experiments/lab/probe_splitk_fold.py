"""Is a decode linear's split-K epilogue worth folding into the next kernel?

Times, on the GPU, a decode linear followed by the residual add and the
next pre-norm's quantizer, two ways (issue #14):
  * 'epilogue': `decode_matmul` (kernel + its XLA epilogue fusion, which
    also takes the residual add), then `rms_norm_quant`: 3 launches;
  * 'fold': `decode_matmul_splitk`, then `rms_norm_quant_splitk` reading
    the partial sums itself: 2 launches; the partials token-major (each
    token's row contiguous), or N-major as `decode_matmul` keeps them
    ('fold_nmajor': a token's row strided by Mp).
Each is timed as the sum of its kernels (CUPTI) and as a chain of
`--chain` dependent steps in one `fori_loop` (the next step's codes are
this step's output; K = N shapes only), whose wall time per step includes
the gaps between launches, as in a decode step. LLaMA-2-7B o_proj
(4096 -> 4096) and down_proj (11008 -> 4096) shapes, random codes.

  bash experiments/device/run.sh py experiments.lab.probe_splitk_fold
"""

import functools
import shlex
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.lab import benchmarking
from pallas_kernels import decode_matmul as dm
from pallas_kernels import int4_layout
from pallas_kernels import rms_norm_quant as rq

_MS = flags.DEFINE_list("ms", ["1", "16"], "Tokens.")
_CASES = flags.DEFINE_list("cases", ["4096x4096", "11008x4096"], "K x N.")
_CHAIN = flags.DEFINE_integer("chain", 200, "Steps of the chained loop.")
_OUT = flags.DEFINE_string("out", "", "JSONL to append to ('' = none).")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Triton kernels in interpret mode (a CPU smoke run).")
_EPS = 1e-5


def _kernels():
  """(decode_matmul implementation, interpret)."""
  return ("triton", True) if _INTERPRET.value else ("mosaic", False)


def _inputs(m: int, k: int, n: int, key):
  mp = dm.padded_rows(m, _kernels()[0])
  kx, kw, ks, kr, kn = jax.random.split(key, 5)
  x = jax.random.randint(kx, (mp, k), -8, 8).astype(jnp.int8)
  x = jnp.where(jnp.arange(mp)[:, None] < m, x, 0)
  s_x = jnp.where(jnp.arange(mp) < m, 0.05, 1.0).astype(jnp.float32)
  w_q = int4_layout.pack_int4(jax.random.randint(kw, (n, k), -8, 8
                                                 ).astype(jnp.int8))
  s_w = jax.random.uniform(ks, (n,), minval=1e-3, maxval=1e-2)
  residual = jax.random.normal(kr, (m, n)).astype(jnp.bfloat16)
  norm_w = (1 + 0.1 * jax.random.normal(kn, (n,))).astype(jnp.bfloat16)
  return mp, x, s_x, w_q, s_w, residual, norm_w


def _epilogue(x, s_x, w_q, s_w, residual, norm_w, *, m, mp):
  impl, interpret = _kernels()
  h = dm.decode_matmul(x, w_q, s_w, s_x, rows=m, out_dtype=jnp.bfloat16,
                       implementation=impl, interpret=interpret) + residual
  x_q, s = rq.rms_norm_quant(h, norm_w, eps=_EPS, out_rows=mp,
                             implementation="pallas", interpret=interpret)
  return x_q, s, h


def _fold(x, s_x, w_q, s_w, residual, norm_w, *, m, mp, token_major=True):
  del m
  impl, interpret = _kernels()
  sk = dm.decode_matmul_splitk(x, w_q, s_w, s_x, implementation=impl,
                               interpret=interpret, token_major=token_major)
  return rq.rms_norm_quant_splitk(sk, residual, norm_w, eps=_EPS,
                                  out_rows=mp, implementation="pallas",
                                  interpret=interpret)


def _chained(step, steps: int):
  """`steps` dependent steps in one loop: codes and h feed the next."""
  def run(x, s_x, w_q, s_w, residual, norm_w):
    def body(_, carry):
      return step(carry[0], carry[1], w_q, s_w, carry[2], norm_w)
    return jax.lax.fori_loop(0, steps, body, (x, s_x, residual))
  return jax.jit(run)


def main(argv):
  del argv
  command = "python -m experiments.lab.probe_splitk_fold " + shlex.join(
      sys.argv[1:])
  records = []
  for case in _CASES.value:
    k, n = map(int, case.split("x"))
    for m in map(int, _MS.value):
      mp, *args = _inputs(m, k, n, jax.random.key(k + m))
      steps = {"epilogue": _epilogue, "fold": _fold,
               "fold_nmajor": functools.partial(_fold, token_major=False)}
      ways = {name: jax.jit(functools.partial(fn, m=m, mp=mp))
              for name, fn in steps.items()}
      outs = {name: fn(*args) for name, fn in ways.items()}
      row = {"case": f"M{m}_K{k}_N{n}"}
      for name in ("fold", "fold_nmajor"):  # against the epilogue's
        (qa, _, ha), (qb, _, hb) = outs["epilogue"], outs[name]
        row[f"{name}_code_diffs"] = int(np.sum(np.asarray(qa)
                                               != np.asarray(qb)))
        row[f"{name}_h_diffs"] = int(np.sum(np.asarray(ha)
                                            != np.asarray(hb)))
      for name, fn in ways.items():
        timings = benchmarking.kernel_timings(fn, *args, iterations=20)
        if timings:
          row[f"{name}_kernels"] = [t[0] for t in timings[0]]
          row[f"{name}_device_us"] = round(1e3 * float(np.median(
              [sum(t for _, t in it) for it in timings])), 2)
        if k == n:
          chained = _chained(functools.partial(steps[name], m=m, mp=mp),
                             _CHAIN.value)
          wall = benchmarking.median_ms(chained, *args, runs=10, inner=1)
          row[f"{name}_chained_us_per_step"] = round(
              1e3 * wall / _CHAIN.value, 2)
      print(row, flush=True)
      records.append(benchmarking.record(
          "splitk_fold", row.pop("case"),
          row.get("fold_chained_us_per_step", row.get("fold_device_us",
                                                      0)) / 1e3,
          {"epilogue": row.get("epilogue_chained_us_per_step",
                               row.get("epilogue_device_us", 0)) / 1e3},
          command=command, **row))
  for r in records:
    print(benchmarking.summary_line(r))
  if _OUT.value:
    benchmarking.append_jsonl(_OUT.value, records)


if __name__ == "__main__":
  app.run(main)
