#!/usr/bin/env bash
# Everything to run on a lent GPU machine in one call (device time is short): GPU tests, the multi-GPU
# smoke check, kernel and chain benchmarks, the one-rank step with and without serial split-K, time to
# first token (eager prefill vs its CUDA graph), the end-to-end engine run. Each part has its own time
# limit; full logs go to $OUT (default ./gpu-logs), a summary is printed last.
# Usage: MAVERICK_COMMIT=<sha> bash scripts/gpu_checklist.sh [part ...]
# Parts: tests tune kernels tp chain step ttft e2e engine spec compiles compiles-spec persistent moe-block ws
# ncu-chain ranks ranks-e2e (default: all but spec, compiles, compiles-spec, persistent, moe-block, ws, ncu-chain,
# ranks and ranks-e2e). ranks and ranks-e2e run real TP over every GPU of the machine (the 8-GPU run).
# One device call runs at most 10 minutes: e.g. "tests ttft" (<= 450 s), "tune kernels" (<= 450 s), "chain
# step" (<= 440 s), "spec" (<= 560 s), "compiles" (<= 450 s), "compiles-spec" (<= 180 s), "moe-block"
# (<= 400 s), "ws" (<= 150 s: the warp-specialized chain experiment), "ncu-chain" (<= 350 s: Nsight Compute
# counters of the persistent chain and of fp8_gemv), "persistent" (<= 400 s), "ranks" (<= 560 s), "ranks-e2e"
# (<= 550 s), then on 2-4 GPUs "tp e2e" (<= 550 s).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-$PWD/gpu-logs}
mkdir -p "$OUT"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
PARTS=${*:-tests tune kernels tp chain step ttft e2e engine}
summary=()

run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc=$rc ($((SECONDS - t0)) s) $(grep -E 'passed|failed|PASSED|FAILED|ms/step|TB/s \||^\| ours|^\| cublas|step wall|e2e \||prefill graph' "$OUT/$name.log" | tail -3 | tr '\n' ' ')")
}

for part in $PARTS; do
  case $part in
    tests) multi=$([ "$GPUS" -ge 2 ] && echo tests/test_allreduce.py)  # its GPU tests need 2 and 4 GPUs
           # the 4-GPU case fails (never skips) where it cannot run; leave it out on 2 GPUs. The load-and-serve
           # compile tests (about a minute each) run in the compiles part.
           only=(-k "not serving_after_load"); [ "$GPUS" -lt 4 ] && only=(-k "not on_gpus[4] and not serving_after_load")
           run gpu_tests 330 python3 -m pytest -q -o addopts="" tests/test_kernels.py tests/test_gpu.py $multi "${only[@]}" -p no:cacheprovider ;;
    tune) run tune 300 python3 -m maverick.bench tune ;;
    kernels) run kernels 150 python3 -m maverick.bench kernels ;;
    tp) if [ "$GPUS" -ge 2 ]; then run tp_check 150 torchrun --nproc_per_node="$(( GPUS >= 4 ? 4 : 2 ))" -m maverick.bench.check_tp
          MAVERICK_HANG_DUMP_S=40 run llm_tp 120 python3 -m maverick.bench.check_llm_tp --tp 2; fi ;;
    ranks) if [ "$GPUS" -ge 2 ]; then  # real TP over every GPU (8 on a DGX): the checks, then the step for real
             run tp_check_all 120 torchrun --nproc_per_node="$GPUS" -m maverick.bench.check_tp
             MAVERICK_HANG_DUMP_S=40 run llm_tp_all 120 python3 -m maverick.bench.check_llm_tp --tp "$GPUS"
             run step_ranks 200 torchrun --nproc_per_node="$GPUS" -m maverick.bench step --batches 1,8,64 --contexts 1024,8192 --ttft 128,1024 --json "$OUT/step_ranks.json"
             MAVERICK_FUSED_ALLREDUCE=0 run step_ranks_nccl 120 torchrun --nproc_per_node="$GPUS" -m maverick.bench step --batches 1,8 --contexts 1024 --json "$OUT/step_ranks_nccl.json"; fi ;;
    ranks-e2e) if [ "$GPUS" -ge 2 ]; then
                 run e2e_ranks 550 torchrun --nproc_per_node="$GPUS" -m maverick.bench step --batches "" --contexts "" --e2e 128/2048,1024/2048 --concurrency 1,16,64,256 --json "$OUT/e2e_ranks.json"; fi ;;
    chain) run chain 160 python3 -m maverick.bench chain ;;
    step) run step 100 python3 -m maverick.bench step --batches 1,8 --contexts 1024,8192 --json "$OUT/step.json"
          run step_two_launch 90 python3 -m maverick.bench step --batches 1,8 --contexts 1024,8192 --no-splitk-serial --json "$OUT/step_two_launch.json"
          run step_no_pdl 90 python3 -m maverick.bench step --batches 1,8 --contexts 1024,8192 --pdl off --json "$OUT/step_no_pdl.json" ;;
    ttft) run ttft 120 python3 -m maverick.bench step --batches "" --contexts "" --ttft 16,128,1024,2048 --json "$OUT/ttft.json" ;;
    e2e) run e2e 200 python3 -m maverick.bench step --batches "" --contexts "" --e2e 128/2048 --concurrency 1,16,64 --json "$OUT/e2e.json"
         run e2e_sync 200 python3 -m maverick.bench step --batches "" --contexts "" --e2e 128/2048 --concurrency 1,16,64 --no-overlap --json "$OUT/e2e_sync.json" ;;
    engine) run engine 150 python3 -m maverick.bench profile-engine --concurrency 1,16,64 --no-profile ;;
    spec) run spec_tests 170 python3 -m pytest -q -o addopts="" -m gpu tests/test_eagle3.py tests/test_step_graphs.py -p no:cacheprovider
          run spec 150 python3 -m maverick.bench spec --draft-lens 1,2,3,4 --json "$OUT/spec.json"
          run spec_fp8 90 python3 -m maverick.bench spec --draft-lens 2,3 --draft-fp8 all --json "$OUT/spec_fp8.json"
          run spec_e2e 150 python3 -m maverick.bench spec-e2e --concurrency 1,4 --draft-lens 1,2,3 --json "$OUT/spec_e2e.json" ;;
    compiles) run compiles_tests 300 python3 -m pytest -q -o addopts="" tests/test_gpu.py -k serving_after_load -p no:cacheprovider
              run compiles 150 python3 -m maverick.bench compiles --max-batch-size 16 --max-num-tokens 1024 --max-seq-len 2048 ;;
    compiles-spec) run compiles_spec 180 python3 -m maverick.bench compiles --max-batch-size 8 --max-num-tokens 1024 --max-seq-len 2048 --max-draft-len 3 ;;
    persistent) run persistent_tests 120 python3 -m pytest -q -o addopts="" tests/test_gpu.py tests/test_kernels.py tests/test_persistent_tail.py -k "persistent or chain or dense_mlp or moe_block_in_one or decoder_layer_tail or layer_tail" -p no:cacheprovider
                run persistent_kernels 140 python3 -m maverick.bench kernels --ops chain --tokens 1
                run persistent_step 140 python3 -m maverick.bench step --batches 1 --contexts 1024,8192 --persistent --json "$OUT/persistent_step.json" ;;
    moe-block) for m in 1 4; do  # the fused MoE block up to 1 or 4 tokens: decode batches 1-4 and the verify
                 run step_moe_block_$m 100 python3 -m maverick.bench --table moe_block_max_tokens=$m step --batches 1,2,3,4 --contexts 1024 --json "$OUT/step_moe_block_$m.json"
                 run spec_moe_block_$m 100 python3 -m maverick.bench --table moe_block_max_tokens=$m spec --draft-lens 2,3 --draft-fp8 all --json "$OUT/spec_moe_block_$m.json"
               done ;;
    ws) run chain_ws 150 python3 benchmarks/experiments/chain_ws_bench.py ;;
    ncu-chain) sections=(--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats
                         --section InstructionStats --section MemoryWorkloadAnalysis --section SchedulerStats)
               ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
               run ncu_chain 200 "$ncu" -k regex:_chain_kernel --launch-skip 2 --launch-count 1 "${sections[@]}" --section SourceCounters python3 benchmarks/experiments/ncu_chain.py
               run ncu_fp8_gemv 150 "$ncu" -k regex:_fp8_gemv_kernel --launch-skip 4 --launch-count 1 "${sections[@]}" python3 benchmarks/experiments/ncu_chain.py ;;
    *) echo "unknown part $part (expected: tests tune kernels tp chain step ttft e2e engine spec compiles compiles-spec persistent moe-block ws ncu-chain ranks ranks-e2e)" >&2; exit 2 ;;
  esac
done
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $GPUS, commit ${MAVERICK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
printf '%s\n' "${summary[@]}"
