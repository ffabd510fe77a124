#!/usr/bin/env bash
# Device call 1 of 2: stage the first half of the SmolLM2 GGUF (the device
# carries at most 64 MiB a call) and the wheels the device image lacks.
set -euo pipefail
mkdir -p /root/stage
cp .carry/p1/gguf.part00 /root/stage/
cp .carry/p1/*.whl /root/stage/
mkdir -p /root/stage/cache && cp .carry/p1/cache/*.json /root/stage/cache/
python3 -c "import jax, flax, orbax.checkpoint, transformers, torch; print(jax.__version__, jax.devices(), flax.__version__, transformers.__version__, torch.__version__)"
python3 -c "import absl, tqdm; print(absl.__file__)" || true
nvidia-smi --query-gpu=name,memory.total --format=csv
ls -la /root/stage
