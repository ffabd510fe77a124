#!/usr/bin/env bash
# The one runner for the GPU device machine. The `run` tool starts it in the
# repository root; logs and JSONL go to $OUT (they come back from there).
#
#   bash experiments/device/run.sh TASK [ARGS...]
#
# Tasks (ARGS go to the python command last, so they override the defaults):
#   env                      jax/flax/orbax/transformers versions, the GPU,
#                            what is staged.
#   stage NAME FIRST [LAST]  copy carried chunks .carry/NAME/chunkFIRST..LAST
#                            to /root/stage/NAME, each checked against the
#                            sha256 in experiments/device/NAME.sha256
#                            (stage.sh put); also keeps carried wheels
#                            (.carry/wheels/*.whl) and enwiki-gensim text
#                            (.carry/cache/*.json) in /root/stage, and
#                            learned rotations (.carry/rotations/rot-*)
#                            in /root/stage/rotations.
#   join NAME                join the staged chunks into /root/stage/FILE,
#                            checking the joined sha256 (NAME: smollm2, qwen).
#   tests-gpu [PYTEST ARGS]  the GPU kernels, not interpreted (paths
#                            default, also when ARGS are only flags:
#                            tests/pallas_kernels tests/test_qlinear.py
#                            tests/test_packed_model.py); e.g. `-m gpu tests`.
#                            The default set takes over 10 min: SHARD=0/4
#                            ... SHARD=3/4 run it in four calls.
#   bench NAME [ARGS]        python -m experiments.bench_NAME, JSONL to $OUT
#                            (e.g. int4_matmul, decode_matmul, attention).
#                            Tensor parallel (#18, kind nvidia-h200-x2):
#                            bench tp --models=llama2-70b,llama2-13b
#                            --tps=2,1 --decode_batches=1,16 --cached=4096
#                            --time_budget_s=450
#   bench-kernels            every kernel benchmark with its default shapes.
#   bench-model [ARGS]       experiments.bench_model (LLaMA shapes, random
#                            weights: needs no staged model). One layer
#                            A/B alone (~3 compiles, not ~11):
#                            --benchmarks=layer_prefill --layer_batches=1
#                            --layer_variants=NAME --layer_stages=false
#   accuracy [ARGS]          experiments.accuracy on the staged SmolLM2
#                            (--eval_texts=enwiki-gensim,code-sympy: both
#                            texts, one quantization per config; code-sympy
#                            needs the sympy wheel from .carry/cache).
#                            Learn in one call, evaluate in the next:
#                            accuracy --sweep=learned ... --learn_only
#                            --rotations_dir=/root/stage/rotations, then
#                            the same flags without --learn_only.
#                            Longer than a call: add
#                            --rotation_time_budget_s=500 and repeat the
#                            call back to back until it exits 0 (75:
#                            paused, state in --rotations_dir).
#                            Block-diagonal rotation (#18; tp=2 is skipped:
#                            9 heads): accuracy --w_bits=4 --a_bits=4
#                            --k_bits=4 --v_bits=4 --w_method=gptq
#                            --rotation_tp=1,2,3 --max_windows=32
#   real-vs-simulated [ARGS] experiments.real_vs_simulated on SmolLM2;
#                            learned rotations: after accuracy --learn_only
#                            (above), --rotate --rotate_mode=learned and
#                            the same rotation flags with
#                            --rotations_dir=/root/stage/rotations.
#                            Perplexities only: --new_tokens=0 (the greedy
#                            comparison after them took over 400 s on an
#                            H200, and a TIMEOUT there loses the record).
#   plot-activations [ARGS]  experiments.plot_activations on SmolLM2.
#   py MODULE [ARGS]         python -m MODULE with the same environment.
# TIMEOUT=SECONDS (default 570) bounds each python command; STAGE_DIR
# (default /root/stage) is where staged files live.
#
# SmolLM2 (98 MB) takes two device calls; the machine keeps /root/stage only
# while it stays warm, so make them back to back:
#   here, once (the chunks; the manifest smollm2.sha256 is committed):
#     bash experiments/device/stage.sh split GGUF smollm2
#     (GGUF: python -c 'from quarot_jax import gguf
#                       print(gguf.find_smollm2_gguf())')
#   call 1 (carry .carry/smollm2/chunk00):
#     bash experiments/device/run.sh stage smollm2 0
#   call 2 (carry .carry/smollm2/chunk01 .carry/wheels .carry/cache):
#     bash experiments/device/run.sh stage smollm2 1 &&
#     bash experiments/device/run.sh join smollm2 &&
#     bash experiments/device/run.sh accuracy --sweep=paper --methods=rtn
#   .carry/wheels holds the gguf reader's wheel (the device has no `gguf`
#   module: cp /opt/pypi/files/gguf-*.whl .carry/wheels/), .carry/cache the
#   enwiki-gensim text (cp ~/.cache/quarot_jax/enwiki_gensim_v1.json). On an
#   H100 (80 GB) the e2e rotation learning needs --rotation_remat (four
#   windows a step asked for 64 GiB more, 2026-12-06).
# The Qwen GGUF goes the same way: stage qwen K, one chunk a call (carry
# .carry/qwen/chunkKK; ~5 s each when back to back, 2026-12-02), the last
# with .carry/cache and .carry/wheels (the gguf reader), then join qwen and
#   accuracy --model=/root/stage/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
#     --sweep=paper --paper_rows=w4a16,w4a4kv4 --center_keys --max_windows=32
#     --out_jsonl=$OUT/accuracy_qwen.jsonl --out_md=$OUT/accuracy_qwen.md
# (--center_keys: Qwen2's keys need it for KV4, see README). Learned e2e
# rotations on Qwen (longer than a call): repeat, back to back, until it
# exits 0 (75: paused, its state kept in /root/stage/rotations)
#   TIMEOUT=590 accuracy --model=QWEN --w_bits=4 --a_bits=4 --k_bits=4
#     --v_bits=4 --w_method=gptq --rotate --rotate_mode=learned
#     --rotation_objective=e2e --rotation_steps=600 --rotation_lr=1.5e-2
#     --rotation_remat --center_keys --rotations_dir=/root/stage/rotations
#     --learn_only --rotation_time_budget_s=480; cp -r
#     /root/stage/rotations $OUT/   (a machine can be lost between calls:
#     copy them to .carry/rotations and carry that with any stage call)
# then the same without --learn_only and the budget, plus --max_windows=32
# --eval_texts=enwiki-gensim,code-sympy and the Qwen --out_jsonl/--out_md
# (GPTQ and both texts: just over 440 s, 2026-12-03: TIMEOUT=440 stopped
# it after its table was written; give it 590). Without --rotation_remat four windows a
# step asked for 186 GiB (H200, 2026-12-03); with it, four windows a step
# ran at 1.08 steps/s (600 steps: two learning calls, 2026-12-03). The
# budget counts from the command's start: that call spent ~127 s before
# its first step (imports, loading Qwen, calibration windows), before the
# GGUF reader and tokenizer caches.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STAGE="${STAGE_DIR:-/root/stage}"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# Drops absl INFO/WARNING lines, Python warnings and progress bars. Each
# carriage return starts a line first: a tqdm bar (leave=False) leaves no
# newline, so the next print would share its line and be dropped with it.
filter() {
  tr '\r' '\n' | grep --line-buffered -v -E \
    "^[WI][0-9]{4} |DeprecationWarning|warnings.warn|it/s\]|s/it\]"
}

gguf_file() {
  case "$1" in
    smollm2) echo "SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    qwen) echo "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf" ;;
    *) echo "unknown model '$1' (smollm2, qwen)" >&2; return 2 ;;
  esac
}

# Carried wheels installed once per machine; staged files exported.
setup_env() {
  if compgen -G "$STAGE/wheels/*.whl" > /dev/null \
      && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site "$STAGE"/wheels/*.whl \
      && touch /tmp/site/.installed
  fi
  export PYTHONPATH="/tmp/site:$PWD"
  [ -d "$STAGE/cache" ] && export QUAROT_JAX_CACHE="$STAGE/cache"
  local f
  f="$STAGE/$(gguf_file smollm2)"
  [ -f "$f" ] && export QUAROT_SMOLLM2_GGUF="$f"
  f="$STAGE/$(gguf_file qwen)"
  [ -f "$f" ] && export QUAROT_QWEN_GGUF="$f"
  return 0
}

# python -m MODULE ARGS, bounded, filtered, logged to $OUT/LOG.log.
py() {
  local log="$1"; shift
  setup_env
  timeout "${TIMEOUT:-570}" python3 -m "$@" 2>&1 | filter \
    | tee -a "$OUT/$log.log"
  local rc="${PIPESTATUS[0]}"
  [ "$rc" = 124 ] && echo "run.sh: python -m $1 stopped by TIMEOUT=${TIMEOUT:-570} s" \
    | tee -a "$OUT/$log.log" >&2
  return "$rc"
}

# One benchmark module, its JSONL sent to $OUT.
bench() {
  local name="$1"; shift
  local out=(--out_dir="$OUT")
  [ "$name" = decode_matmul ] && out=(--out="$OUT/decode_matmul.jsonl")
  py "bench_$name" "experiments.bench_$name" "${out[@]}" "$@"
}

task="${1:-}"
shift || true
case "$task" in
  env)
    setup_env
    python3 -c "import jax, flax, orbax.checkpoint, transformers
print('jax', jax.__version__, jax.devices())
print('flax', flax.__version__, 'transformers', transformers.__version__)"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    ls -la "$STAGE" 2>/dev/null
    ;;
  stage)
    [ $# -ge 2 ] || {
      echo "usage: run.sh stage NAME FIRST [LAST]" >&2; exit 2; }
    bash "$HERE/stage.sh" put "$@" || exit 1
    for kind in wheels cache; do
      if compgen -G ".carry/$kind/*" > /dev/null; then
        mkdir -p "$STAGE/$kind" && cp -n .carry/"$kind"/* "$STAGE/$kind/"
      fi
    done
    # Learned rotations brought back from a lost machine's $OUT/rotations.
    if compgen -G ".carry/rotations/rot-*" > /dev/null; then
      mkdir -p "$STAGE/rotations" && cp -rn .carry/rotations/rot-* \
        "$STAGE/rotations/" && ls "$STAGE/rotations"
    fi
    bash "$HERE/stage.sh" have "$1"
    ;;
  join)
    [ $# -eq 1 ] || { echo "usage: run.sh join NAME" >&2; exit 2; }
    file="$(gguf_file "$1")" || exit 2
    if [ -f "$STAGE/$file" ]; then
      echo "$STAGE/$file"
    else
      bash "$HERE/stage.sh" join "$1" "$STAGE/$file"
    fi
    ;;
  tests-gpu)
    flags=(); paths=(); value=0  # pytest flags (with values), test paths
    for a in "$@"; do
      if [ "$value" = 1 ]; then flags+=("$a"); value=0
      elif [ "${a#-}" = "$a" ]; then paths+=("$a")
      else
        flags+=("$a")
        case "$a" in -m|-k|-p|--deselect|--ignore) value=1 ;; esac
      fi
    done
    [ "${#paths[@]}" -gt 0 ] || paths=(tests/pallas_kernels \
      tests/test_qlinear.py tests/test_packed_model.py)
    if [ -n "${SHARD:-}" ]; then
      # SHARD=K/N: the tests at K, K + N, K + 2N, ... (0-based) of those
      # collected from the paths, so the GPU suite (over 10 min) runs whole
      # in N calls.
      k="${SHARD%/*}"; n="${SHARD#*/}"
      case "$k/$n" in
        *[!0-9/]*|/*|*/) echo "run.sh: SHARD=$SHARD is not K/N" >&2; exit 2 ;;
      esac
      [ "$k" -lt "$n" ] || { echo "run.sh: SHARD=$SHARD needs K < N" >&2
                             exit 2; }
      setup_env
      mapfile -t paths < <(python3 -m pytest --collect-only -q "${paths[@]}" \
        2>/dev/null | grep "::" | awk -v k="$k" -v n="$n" '(NR-1) % n == k')
      echo "run.sh: SHARD=$SHARD: ${#paths[@]} tests"
      # No paths would leave pytest its default: every test.
      [ "${#paths[@]}" -gt 0 ] || exit 0
    fi
    set -- "${flags[@]}" "${paths[@]}"
    # No -q here: with an ARGS -q, -qq would drop the summary line.
    py tests_gpu pytest --tb=short "$@" | tail -30
    ;;
  bench)
    [ $# -ge 1 ] || { echo "usage: run.sh bench NAME [ARGS]" >&2; exit 2; }
    name="$1"; shift
    bench "$name" "$@"
    ;;
  bench-kernels)
    for name in int4_matmul decode_matmul hadamard_quant kv4_attention; do
      bench "$name"
    done
    ;;
  bench-model)
    py bench_model experiments.bench_model --out_dir="$OUT" "$@"
    ;;
  accuracy)
    # Default outputs only where ARGS name none (records keep the command).
    outs=()
    [[ " $* " == *" --out_jsonl="* ]] \
      || outs+=(--out_jsonl="$OUT/accuracy_smollm2.jsonl")
    [[ " $* " == *" --out_md="* ]] || outs+=(--out_md="$OUT/accuracy_smollm2.md")
    py accuracy experiments.accuracy "${outs[@]}" "$@"
    ;;
  real-vs-simulated)
    py real_vs_simulated experiments.real_vs_simulated --out_dir="$OUT" "$@"
    ;;
  plot-activations)
    py plot_activations experiments.plot_activations \
      --out="$OUT/activations_smollm2.png" "$@"
    ;;
  py)
    [ $# -ge 1 ] || { echo "usage: run.sh py MODULE [ARGS]" >&2; exit 2; }
    py "${1##*.}" "$@"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' \
      "$0" >&2
    exit 2
    ;;
esac
