#!/usr/bin/env bash
# The main job on the bundled tiny default: make the checkpoint, quantize to FP8 with ModelOpt,
# build an engine, generate. Runs on CPU in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY scripts/make_tiny_checkpoint.py --output tiny/checkpoint
$PY quantize.py --model tiny/checkpoint --output tiny/checkpoint-fp8 --kv-cache-dtype fp8 --calib-size 16
$PY build_engine.py --checkpoint tiny/checkpoint-fp8 --output tiny/engine --config configs/cpu-tiny.yaml
$PY -m maverick.generate tiny/engine "The harbor was quiet" "Memory bandwidth limits" --max-tokens 24 --device cpu
