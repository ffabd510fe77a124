#!/usr/bin/env bash
# Stages a file larger than one device call can carry (64 MiB a call, the
# working tree included) in chunks of 56 MiB, one device call per chunk
# range, each chunk's sha256 checked on arrival against a committed manifest
# (experiments/device/NAME.sha256), the joined file's sha256 checked at the
# end. Chunks wait in /root/stage/NAME/ on the device, which keeps them only
# while the machine stays warm: run the calls back to back, then the work.
#
# Here, once (writes .carry/NAME/chunkNN, ignored by git, and the manifest):
#   bash experiments/device/stage.sh split ~/.cache/quarot_jax/X.gguf qwen
# Device call k (carry .carry/NAME/chunkFIRST .. chunkLAST, <= 8 paths):
#   bash experiments/device/stage.sh put qwen FIRST [LAST]
# Device, after the last chunk (prints the joined path; deletes the chunks):
#   bash experiments/device/stage.sh join qwen \
#       /root/stage/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
#   export QUAROT_QWEN_GGUF=/root/stage/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
# Status (which chunks arrived): bash experiments/device/stage.sh have qwen
#
# Qwen2.5-Coder-1.5B (1,117,320,768 bytes): 20 chunks of 56 MiB in the
# committed manifest (chunk00..chunk19, re-split 2026-12-06).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STAGE="${STAGE_DIR:-/root/stage}"
# 56 MiB leaves ~8 MiB for the tracked tree (4.7 MiB on 2026-12-06, when a
# 60 MiB chunk no longer fit). Manifests split before then hold 60 MiB
# chunks; `split` rewrites the manifest, so re-split and commit it.
CHUNK_BYTES=$(( ${CHUNK_MIB:-56} * 1024 * 1024))

manifest() { echo "$HERE/$1.sha256"; }

case "${1:-}" in
  split)
    src="$2"; name="$3"; out=".carry/$name"
    mkdir -p "$out"
    rm -f "$out"/chunk??
    split -b "$CHUNK_BYTES" -d -a 2 "$src" "$out/chunk"
    {
      (cd "$out" && sha256sum chunk??)
      echo "$(sha256sum "$src" | cut -d' ' -f1)  joined $(stat -c %s "$src")"
    } > "$(manifest "$name")"
    ls "$out" | wc -l
    ;;
  put)
    name="$2"; first="$3"; last="${4:-$3}"
    mkdir -p "$STAGE/$name"
    for k in $(seq "$first" "$last"); do
      chunk=$(printf "chunk%02d" "$k")
      want=$(grep " $chunk\$" "$(manifest "$name")" | cut -d' ' -f1)
      got=$(sha256sum ".carry/$name/$chunk" | cut -d' ' -f1)
      if [ -z "$want" ] || [ "$want" != "$got" ]; then
        echo "$chunk: sha256 $got, manifest says '${want}'" >&2
        exit 1
      fi
      cp ".carry/$name/$chunk" "$STAGE/$name/$chunk"
      echo "$chunk ok"
    done
    ;;
  have)
    name="$2"
    n=$(grep -c ' chunk' "$(manifest "$name")")
    ls "$STAGE/$name" 2>/dev/null | sort | tr '\n' ' '
    echo "($(ls "$STAGE/$name" 2>/dev/null | wc -l) of $n)"
    ;;
  join)
    name="$2"; dest="$3"
    line=$(grep ' joined ' "$(manifest "$name")")
    want=$(echo "$line" | cut -d' ' -f1)
    size=$(echo "$line" | cut -d' ' -f4)
    chunks=$(grep ' chunk' "$(manifest "$name")" | awk '{print $2}')
    for c in $chunks; do
      [ -f "$STAGE/$name/$c" ] || { echo "missing $c" >&2; exit 1; }
    done
    (cd "$STAGE/$name" && cat $chunks) > "$dest.tmp"
    got=$(sha256sum "$dest.tmp" | cut -d' ' -f1)
    if [ "$got" != "$want" ] || [ "$(stat -c %s "$dest.tmp")" != "$size" ]; then
      echo "joined: sha256 $got, want $want ($size bytes)" >&2
      rm -f "$dest.tmp"
      exit 1
    fi
    mv "$dest.tmp" "$dest"
    rm -rf "${STAGE:?}/$name"
    echo "$dest"
    ;;
  *)
    sed -n '2,21p' "$0" >&2
    exit 2
    ;;
esac
