#!/usr/bin/env bash
# The main job on the bundled default, a small Llama 4 trained on Shakespeare (maverick/data/shakespeare):
# quantize to FP8 with ModelOpt, build an engine, generate. Runs on CPU in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=maverick/data/shakespeare
$PY quantize.py --model $MODEL --output out/shakespeare-fp8 --kv-cache-dtype fp8 --calib-data $MODEL/calib.jsonl --calib-size 64
$PY build_engine.py --checkpoint out/shakespeare-fp8 --output out/engine --config configs/cpu-tiny.yaml --overwrite
$PY -m maverick.generate out/engine "ROMEO.
O" "To be, or not to be," --max-tokens 48 --temperature 0.8 --seed 1 --device cpu
