#!/usr/bin/env bash
# The GPU measurements the open issues still wait for, one part per device call (each well under the
# device's 10-minute limit), in the order the issues need them. For maintainers with a lent GPU:
#
#   bash scripts/gpu_backlog.sh PART OUTDIR
#
# PART:
#   tests     the GPU tests of the kernels (one-launch prepare kernels included), the GPU store (its
#             one-launch fill), DoRA and multi-LoRA (~5 min)
#   prepare   prepare() of both backends in CUDA graphs, one-launch against the tensor operations
#             (issue 23; ~1 min)
#   adapters  2,000 vs 5 random adapters, Zipf, Llama-3.2-1B shape, the same flags (issue 22; ~8 min),
#             then the GPU store's slot fill
#   serving   served vs offline, overlap on/off, base-only with default memory (issue 18; ~10 min)
#   tune      the kernel tuner's quick grid, then the kernel grid without and with its plan (issue 23)
#
# Every result lands in OUTDIR (JSON, plus the tables printed); record the commit you ran, as the
# device's copy of the tree may not know it.
set -euo pipefail
part=${1:?usage: gpu_backlog.sh PART OUTDIR}
out=${2:?usage: gpu_backlog.sh PART OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}

case "$part" in
tests)
    $py -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_gpu_store.py \
        tests/test_dora.py tests/test_multi_lora.py tests/test_kernel_plans.py 2>&1 | tail -40 | tee "$out/gpu_tests.txt"
    ;;
prepare)
    $py benchmarks/bench_lora_kernels.py --only-prepare 2>&1 | tee "$out/prepare.txt"
    ;;
adapters)
    common=(--config-dir benchmarks/configs/llama-3.2-1b --lora-ranks 8 16 32 64
        --lora-target-modules q_proj k_proj v_proj o_proj --lora-request-distribution zipf
        --num-prompts 2000 --input-len 256 --output-len 128 --max-running-requests 64
        --max-loras-per-batch 32 --engine-setting lora_gpu_store_gib=8
        --engine-setting max_loaded_lora_gib=32 --engine-setting enable_lora_overlap_loading=true)
    for n in 5 2000; do
        $py benchmarks/bench_offline.py "${common[@]}" --num-adapters "$n" --adapter-dir "/tmp/ad$n" \
            --output-file "$out/offline_${n}zipf.json" 2>&1 | grep -v "adapter/s" | tail -20
    done
    $py benchmarks/bench_store_fill.py --output-file "$out/store_fill.json" 2>&1 | tail -15
    ;;
serving)
    $py benchmarks/bench_serving_core.py --part served-overlap --part offline --part served-sync \
        --part served-base-only --output-file "$out/core_parts.json" 2>&1 | tail -40
    $py benchmarks/bench_serving_core.py --summarize "$out/core_parts.json" --markdown "$out/core_parts.md"
    ;;
tune)
    $py benchmarks/tune_lora_kernels.py --quick --time-limit 300 --output-file "$out/plans.json" 2>&1 | tail -20
    $py benchmarks/bench_lora_kernels.py --quick --no-prepare --plans off --tag plans-off --out "$out" 2>&1 | tail -5
    $py benchmarks/bench_lora_kernels.py --quick --no-prepare --plans "$out/plans.json" --tag plans-tuned \
        --out "$out" 2>&1 | tail -5
    ;;
*)
    echo "unknown part $part: tests, prepare, adapters, serving or tune" >&2
    exit 2
    ;;
esac
