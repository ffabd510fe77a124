#!/usr/bin/env bash
# Sourced at the start of a device run: joins the GGUF halves staged by
# stage_part1.sh and installs the carried wheels. Exports QUAROT_SMOLLM2_GGUF.
set -euo pipefail
if [ -f .carry/p2/gguf.part01 ]; then
  cat /root/stage/gguf.part00 .carry/p2/gguf.part01 > /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd /root/stage && echo "$(cut -d' ' -f1 "$OLDPWD/.carry/p2/gguf.md5")  SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c -)
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site /root/stage/*.whl
export PYTHONPATH=/tmp/site:$PWD
export QUAROT_SMOLLM2_GGUF=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONUNBUFFERED=1
