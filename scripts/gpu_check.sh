#!/usr/bin/env bash
# Prove the GPU path on any CUDA machine in minutes, through the CLI only:
#   AMP training (bf16, fp16 + grad scaler), 2-process DDP when two GPUs exist, the quickstart
#   pipeline, every GPU backend that is installed, layer-wise ONNX Runtime vs TensorRT parity
#   (polygraphy), mIoU per backend, and a Markdown report that says what it skipped and why.
#
#   bash scripts/gpu_check.sh [OUT]          # default OUT: runs/gpu_check
#   STEPS=50 RECIPE=recipes/quickstart.yaml bash scripts/gpu_check.sh
#
# Exit code: 0 when every step that could run passed, 1 when one failed, 2 without a CUDA GPU.
set -uo pipefail

OUT=${1:-runs/gpu_check}
RECIPE=${RECIPE:-recipes/quickstart.yaml}
STEPS=${STEPS:-50}
REPORT="$OUT/report.md"
FAILED=0
mkdir -p "$OUT"
: > "$REPORT"

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
skip() { say "- **skipped** $1: $2"; }
# step NAME CMD...: run CMD with its log in $OUT/logs/NAME.log, report ok/FAILED with the time taken
step() {
    local name=$1 start=$SECONDS
    shift
    mkdir -p "$OUT/logs"
    if "$@" > "$OUT/logs/$name.log" 2>&1; then
        say "- ok $name ($((SECONDS - start)) s)"
    else
        say "- **FAILED** $name ($((SECONDS - start)) s): see logs/$name.log; last line: $(tail -n 1 "$OUT/logs/$name.log")"
        FAILED=1
    fi
}
py() { python - "$@"; }

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
    echo "no CUDA GPU here (nvidia-smi fails): nothing to check" >&2
    exit 2
fi
GPUS=$(nvidia-smi -L | wc -l)

say "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
say ""
say '```'
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee -a "$REPORT"
py <<'EOF' | tee -a "$REPORT"
import importlib, platform
print("python", platform.python_version())
for name in ("fakd_deploy", "torch", "onnxruntime", "tensorrt", "cuda.bindings", "polygraphy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except ImportError:
        print(name, "not installed")
try:
    import onnxruntime
    print("onnxruntime providers:", ", ".join(onnxruntime.get_available_providers()))
except ImportError:
    pass
EOF
say '```'

say ""
say "## Training"
BF16=$(py <<'EOF'
import torch
print(int(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
EOF
)
if [[ $BF16 == 1 ]]; then
    step train-bf16 fakd-deploy train "$RECIPE" --role baseline --out "$OUT/amp-bf16" \
        --set student.train.steps="$STEPS" --set student.train.amp=bf16
else
    skip train-bf16 "this GPU has no bf16 support (torch.cuda.is_bf16_supported() is False)"
fi
step train-fp16 fakd-deploy train "$RECIPE" --role baseline --out "$OUT/amp-fp16" \
    --set student.train.steps="$STEPS" --set student.train.amp=fp16
if (( GPUS >= 2 )); then
    step train-ddp torchrun --no-python --nproc_per_node 2 fakd-deploy train "$RECIPE" --role baseline \
        --out "$OUT/ddp" --set student.train.steps="$STEPS" --set student.train.amp=auto
else
    skip train-ddp "one GPU visible; DDP needs two"
fi

say ""
say "## Pipeline and backends"
# Which backends can run here, and why the others cannot (one "name<TAB>reason" line each).
py > "$OUT/backends.tsv" <<'EOF'
from fakd_deploy.deploy.backends import BACKENDS
from fakd_deploy.deploy.runtime import unavailable_reason
for name in BACKENDS:
    print(f"{name}\t{unavailable_reason(name) or ''}")
EOF
BACKENDS=()
while IFS=$'\t' read -r name reason; do
    if [[ -z $reason ]]; then BACKENDS+=("$name"); else skip "$name" "$reason"; fi
done < "$OUT/backends.tsv"
LIST=$(IFS=,; echo "${BACKENDS[*]}")
say "- backends to build: $LIST"

RUN="$OUT/run"
step pipeline fakd-deploy run "$RECIPE" --out "$RUN" \
    --set teacher.train.steps="$STEPS" --set student.train.steps="$STEPS" \
    --set student.train.amp=auto --set "deploy.backends=[$LIST]"
ONNX=$(ls "$RUN"/deploy/*.onnx 2> /dev/null | grep -v -E '\.(int8|qdq|fp16)\.onnx$' | head -n 1)
if [[ -z $ONNX ]]; then
    skip backends "the pipeline exported no ONNX model"
else
    STEM=${ONNX%.onnx}
    for backend in "${BACKENDS[@]}"; do
        case $backend in
            trt-*) artifact="$STEM.${backend#trt-}.engine" ;;
            ort-cpu-int8) artifact="$STEM.int8.onnx" ;;
            ort-trt-int8) artifact="$STEM.qdq.onnx" ;;
            ort-cuda-fp16) artifact="$STEM.fp16.onnx" ;;
            *) artifact="$ONNX" ;;
        esac
        data=()  # calibration data: INT8 builds only
        [[ $backend == *int8 ]] && data=(--calib 32)
        [[ -e $artifact ]] || step "build-$backend" fakd-deploy build "$ONNX" --backend "$backend" "${data[@]}"
        step "evaluate-$backend" fakd-deploy evaluate "$artifact" --backend "$backend" \
            --json "$OUT/evaluate-$backend.json"
    done

    say ""
    say "## Parity"
    if ! command -v polygraphy > /dev/null; then
        skip polygraphy "not installed (pip install polygraphy)"
    elif [[ " ${BACKENDS[*]} " != *" trt-fp32 "* ]]; then
        skip polygraphy "TensorRT cannot run here"
    else
        # Every tensor marked as an output on both sides: the first layer that drifts is named.
        step polygraphy-layerwise polygraphy run "$ONNX" --onnxrt --trt \
            --onnx-outputs mark all --trt-outputs mark all --atol 1e-3 --rtol 1e-3
    fi
    step bench fakd-deploy bench "$RUN" --out "$OUT/bench"
fi

say ""
say "## mIoU per backend"
py "$OUT" <<'EOF' | tee -a "$REPORT"
import json, sys
from pathlib import Path
rows = sorted(Path(sys.argv[1]).glob("evaluate-*.json"))
print("| backend | mIoU | pixel acc |\n|---|---:|---:|")
for path in rows:
    result = json.loads(path.read_text())
    print(f"| {path.stem.removeprefix('evaluate-')} | {result['miou']:.2f} | {result['pixel_acc']:.2f} |")
if not rows:
    print("| (no backend was evaluated) | | |")
EOF

say ""
if (( FAILED )); then say "Result: **some steps failed** (see above)."; else say "Result: every step that could run passed."; fi
echo "report: $REPORT"
exit $FAILED
