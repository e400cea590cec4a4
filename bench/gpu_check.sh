#!/usr/bin/env bash
# The GPU check: on a CUDA machine, on the embedded model (SmolLM2-135M), in one go:
#   1. the recording benchmark (bench/collect_vs_forward.py) in float16 and in bfloat16: recording
#      over min(bare forward, the disk's sequential write rate), the writer beside the model and in
#      the loop, and the disk's rate;
#   2. collect of the demo data, then `fn-analyze ica` with its reduction on CUDA and on the
#      CPU over the same shards: both times, and whether the stable networks come back (IoU >= 0.9);
#      then the ICA with no cache (`--model --dataset`: its passes run the model), its time and its
#      stable networks against the cached run's;
#   3. `fn-analyze evaluate` of the CUDA mask file (a few draws, on part of the eval data);
#   4. `fn-train --use_4bit` for 20 steps with network 0 switched off, then a check that every
#      masked neuron's LoRA entries stayed zero (its parameters did not move) and open ones trained;
#   5. the mask-overhead benchmark (bench/mask_overhead.py), 2 rounds.
# Prints one `name: value` line per figure (each command's own output goes to $WORK/logs/).
#
#   bench/gpu_check.sh            # the GPU check (under 8 minutes on one GPU)
#   bench/gpu_check.sh --smoke    # the same steps on the CPU, a tiny model and tiny sizes (the test suite)
#
# Run from anywhere; it tests the checkout it lives in. WORK (default: a temporary folder,
# removed at the end) keeps everything when set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
if [[ -n "${WORK:-}" ]]; then
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d -t gpu-check-XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/logs"

if ((SMOKE)); then
    DEVICE=cpu
    python bench/gpu_check.py tiny-model "$WORK/tiny" >"$WORK/logs/tiny.log" 2>&1
    MODEL="$WORK/tiny"
    BENCH_RECORDS=20 REPEATS=1 COMPONENTS=5 EVAL_LIMIT=10 DRAWS=1 NETWORKS="--networks 0,1" TRAIN_STEPS=3
    OVERHEAD="--rounds 1 --steps 3 --warmup 1"
else
    DEVICE=cuda
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "error: no CUDA device; run bench/gpu_check.sh --smoke for the CPU fallback" >&2
        exit 2
    }
    MODEL=smollm2-135m
    BENCH_RECORDS=400 REPEATS=2 COMPONENTS=20 EVAL_LIMIT=100 DRAWS=3 NETWORKS="" TRAIN_STEPS=20 OVERHEAD="--rounds 2"
fi
echo "device: $DEVICE"
echo "model: $MODEL"

# Runs a step with its output in $WORK/logs/NAME.log. On failure it shows the log's tail and the
# check goes on (a GPU lease is too short to lose every step after one failure): the step's
# figures read `failed`, and the script exits 1 at the end.
FAILED=0 STEP_OK=1
run() {
    local name="$1"
    shift
    STEP_OK=1
    if ! "$@" >"$WORK/logs/$name.log" 2>&1; then
        echo "error: step $name failed; the end of its log:" >&2
        tail -n 30 "$WORK/logs/$name.log" >&2
        FAILED=1 STEP_OK=0
    fi
}
# Prints `NAME: VALUE`, or `NAME: failed` when the last step failed.
figure() { if ((STEP_OK)); then echo "$1: $2"; else echo "$1: failed"; fi; }
# The value after `KEY: ` (or `KEY=`) on the last line of a step's log that holds KEY.
value() { grep -E "$2" "$WORK/logs/$1.log" | tail -n 1 | sed -E "s/.*$2[:=] ?//"; }
seconds_since() { python -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }

for dtype in float16 bfloat16; do
    run "collect_bench_$dtype" python bench/collect_vs_forward.py --model "$MODEL" --device "$DEVICE" \
        --dtype "$dtype" --tiny-batch-sizes "" --records "$BENCH_RECORDS" --batch-size 16 --repeats "$REPEATS"
    # Recording (the writer beside the model) over min(bare forward, the disk's own write rate); goal >= 0.8.
    figure "collect_vs_forward_$dtype" "$(value "collect_bench_$dtype" 'collect_vs_forward: ratio')"
    figure "collect_in_loop_vs_forward_$dtype" "$(value "collect_bench_$dtype" 'in_loop_ratio')"
    figure "collect_disk_write_mib_s_$dtype" "$(value "collect_bench_$dtype" 'disk_write_mib_s')"
done

run demo_data python -m fn_analyze.cli demo-data --out "$WORK/demo"
start=$(date +%s.%N)
run collect python -m fn_analyze.cli collect --model "$MODEL" --dataset "$WORK/demo/data.jsonl" \
    --out "$WORK/acts" --device "$DEVICE" --dtype bfloat16 --overwrite
figure "collect_bfloat16_seconds" "$(seconds_since "$start")"

# The whole `ica` command with its reduction on the device, then on the CPU: the difference is the reduction's.
for side in device cpu; do
    start=$(date +%s.%N)
    run "ica_$side" python -m fn_analyze.cli ica --activations "$WORK/acts" --n-components "$COMPONENTS" \
        --device "$([[ $side == device ]] && echo "$DEVICE" || echo cpu)" --out "$WORK/masks/ica-$side.json" \
        --keep-unstable --overwrite
    figure "ica_reduction_on_${side}_seconds" "$(seconds_since "$start")"
done
run same_networks python bench/gpu_check.py same-networks "$WORK/masks/ica-device.json" "$WORK/masks/ica-cpu.json"
figure "ica_device_vs_cpu_identical_networks" "$(value same_networks identical_networks)"
figure "ica_device_vs_cpu_stable_networks_matched" "$(value same_networks stable_networks_matched)"

# The ICA with no cache: its passes run the model over the data, in collect's dtype above.
start=$(date +%s.%N)
run ica_no_cache python -m fn_analyze.cli ica --model "$MODEL" --dataset "$WORK/demo/data.jsonl" \
    --dtype bfloat16 --n-components "$COMPONENTS" --device "$DEVICE" --out "$WORK/masks/ica-no-cache.json" \
    --keep-unstable --overwrite
figure "ica_no_cache_seconds" "$(seconds_since "$start")"
run same_networks_no_cache python bench/gpu_check.py same-networks "$WORK/masks/ica-no-cache.json" \
    "$WORK/masks/ica-device.json"
figure "ica_no_cache_vs_cached_stable_networks_matched" "$(value same_networks_no_cache stable_networks_matched)"

start=$(date +%s.%N)
# shellcheck disable=SC2086  # NETWORKS is empty or one flag and its value
run evaluate python -m fn_analyze.cli evaluate --model "$MODEL" --mask-file "$WORK/masks/ica-device.json" \
    --dataset "$WORK/demo/eval.csv" --activations "$WORK/acts" --limit "$EVAL_LIMIT" --draws "$DRAWS" \
    --network-draws 0 --device "$DEVICE" --out "$WORK/eval/eval.json" $NETWORKS
figure "evaluate_seconds" "$(seconds_since "$start")"

start=$(date +%s.%N)
run qlora python -m fn_train.cli --model_name_or_path "$MODEL" --dataset_name_or_path "$WORK/demo/train.csv" \
    --output_dir "$WORK/ft" --mask-file "$WORK/masks/ica-device.json" --mask-mode key --networks 0 \
    --use_4bit --max_steps "$TRAIN_STEPS" --per_device_train_batch_size 4 --device "$DEVICE"
figure "qlora_${TRAIN_STEPS}_steps_seconds" "$(seconds_since "$start")"
run masked_adapter python bench/gpu_check.py masked-adapter "$WORK/ft"
figure "qlora_masked_parameters_unchanged" "$(value masked_adapter masked_parameters_unchanged)"
figure "qlora_open_parameters_trained" "$(value masked_adapter open_parameters_trained)"

# shellcheck disable=SC2086  # OVERHEAD holds several flags
run mask_overhead python bench/mask_overhead.py --model "$MODEL" --data "$WORK/demo/train.csv" \
    --mask-file "$WORK/masks/ica-device.json" --device "$DEVICE" $OVERHEAD
figure "mask_overhead" "$(value mask_overhead 'mask_overhead: ratio')"
exit "$FAILED"
