#!/usr/bin/env bash
# Prove the GPU path on one CUDA machine in minutes, offline, through the CLI only.
#
#   bash scripts/gpu_check.sh [--training-only] [--dry-run] [OUT]     # OUT: runs/gpu_check
#   STEPS=50 RECIPE=recipes/quickstart.yaml BUDGET=450 bash scripts/gpu_check.sh
#
# It installs nothing and downloads nothing (the recipe's data is synthetic, no pretrained
# weights): it runs this source tree with whatever is installed, says which stack it found,
# then runs what that stack allows:
#   training   AMP bf16 (where the GPU has it) and fp16 with the gradient scaler, 2-process DDP
#              when two GPUs are visible, the quickstart pipeline (teacher, KD and FAKD
#              students, export) with the GPU deploy backends;
#   deploy     every GPU backend that can run here: build, evaluate (mIoU), bench (host
#              latency and GPU compute), and ONNX Runtime against TensorRT layer by layer
#              (polygraphy) where both are installed.
# Each step has its log in OUT/logs/. OUT/report.md and OUT/report.json hold the stack, every
# step with its status, time and reason, and the mIoU per backend.
#
# Exit code: 0 when every step that ran passed and (unless --training-only) at least one GPU
# deploy backend ran; 1 otherwise (a step failed, no GPU backend ran, or the time budget of
# BUDGET seconds ran out); 2 without a CUDA GPU. --dry-run needs no GPU: it reports the stack
# and the plan (every step "planned") and exits 0.
set -uo pipefail

TRAINING_ONLY=0
DRY_RUN=0
OUT=runs/gpu_check
for arg in "$@"; do
    case $arg in
        --training-only) TRAINING_ONLY=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        -*) echo "unknown option $arg (use --training-only, --dry-run)" >&2; exit 2 ;;
        *) OUT=$arg ;;
    esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECIPE=${RECIPE:-$ROOT/recipes/quickstart.yaml}
STEPS=${STEPS:-50}
BUDGET=${BUDGET:-450}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 MPLBACKEND=Agg
mkdir -p "$OUT/logs"
STEP_LOG="$OUT/steps.tsv"
: > "$STEP_LOG"
FAILED=0
GPU_BACKENDS_OK=0
START=$SECONDS

# The CLI of this source tree, installed or not
FAKD=(python -c 'import sys; from fakd_deploy.cli import app; sys.argv[0] = "fakd-deploy"; app()')
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEP_LOG"; echo "$2 $1 ${4:+($4)}"; }
skip() { record "$1" skipped 0 "$2"; }
# step NAME CMD...: run CMD within the remaining budget, log in OUT/logs/NAME.log
step() {
    local name=$1 start=$SECONDS left=$((BUDGET - (SECONDS - START))) shown
    shift
    if ((DRY_RUN)); then
        shown="$*"
        record "$name" planned 0 "${shown/"${FAKD[*]}"/fakd-deploy}"
        return 0
    fi
    if ((left <= 0)); then
        record "$name" FAILED 0 "the time budget of $BUDGET s ran out before it"
        FAILED=1
        return 1
    fi
    if timeout "$left" "$@" > "$OUT/logs/$name.log" 2>&1; then
        record "$name" ok $((SECONDS - start)) ""
        return 0
    fi
    record "$name" FAILED $((SECONDS - start)) "logs/$name.log: $(tail -n 1 "$OUT/logs/$name.log" | tr '\t' ' ')"
    FAILED=1
    return 1
}

# The stack: what is installed and what each backend says about this machine.
python - "$OUT/stack.json" << 'EOF'
import json, platform, subprocess, sys
from fakd_deploy import optional
from fakd_deploy.deploy import cuda
from fakd_deploy.deploy.backends import BACKENDS
from fakd_deploy.deploy.runtime import unavailable_reason

def smi(query):
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []

gpus = smi("name,compute_cap,memory.total")
torch = optional.load("torch") if gpus else None  # seconds to import; only a GPU needs it here
ort = optional.load("onnxruntime")
stack = {
    "gpus": gpus,
    "driver": (smi("driver_version") or ["none"])[0],
    **cuda.versions(),
    "no_gpu_reason": cuda.no_gpu_reason(),
    "python": platform.python_version(),
    "torch": str(getattr(torch, "__version__", "not installed" if gpus else "not checked (no GPU)")),
    "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None) if torch else None,
    "bf16": bool(torch and torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    "onnx": optional.version("onnx"),
    "onnxruntime": optional.version("onnxruntime"),
    "onnxruntime_providers": ort.get_available_providers() if ort else [],
    "tensorrt": optional.version("tensorrt"),
    "polygraphy": optional.version("polygraphy"),
    "backends": {name: unavailable_reason(name) for name in BACKENDS},
}
json.dump(stack, open(sys.argv[1], "w"), indent=2)
EOF
# Shell variables from the stack: GPUS, BF16, ORT, and one "name<TAB>reason" line per backend.
stack() { python -c 'import json, sys; print(eval(sys.argv[2], {"s": json.load(open(sys.argv[1]))}))' "$OUT/stack.json" "$1"; }
GPUS=$(stack 'len(s["gpus"])')
BF16=$(stack 'int(s["bf16"])')
ORT=$(stack 'int(s["onnxruntime"] != "not installed")')
mapfile -t RUNNABLE < <(stack '"\n".join(n for n, r in s["backends"].items() if r is None)')
if ((GPUS == 0)) && ((!DRY_RUN)); then
    echo "no CUDA GPU here ($(stack 's["no_gpu_reason"]')): nothing to check" >&2
    exit 2
fi
GPU_LIST=()
for name in "${RUNNABLE[@]}"; do
    [[ $name == ort-cpu-* || -z $name ]] || GPU_LIST+=("$name")
done
if ((TRAINING_ONLY)); then GPU_LIST=(); fi
mapfile -t MISSING < <(stack '"\n".join(n for n, r in s["backends"].items() if r and not n.startswith("ort-cpu"))')
for name in "${MISSING[@]}"; do
    [[ -z $name ]] || skip "$name" "$(stack "s['backends']['$name']")"
done

# Training: AMP, DDP, then the pipeline (teacher, KD and FAKD students, export, GPU builds).
if ((BF16)) || ((DRY_RUN)); then
    step train-bf16 "${FAKD[@]}" train "$RECIPE" --role baseline --out "$OUT/amp-bf16" \
        --set student.train.steps="$STEPS" --set student.train.amp=bf16
else
    skip train-bf16 "this GPU has no bf16 (torch.cuda.is_bf16_supported() is False)"
fi
step train-fp16 "${FAKD[@]}" train "$RECIPE" --role baseline --out "$OUT/amp-fp16" \
    --set student.train.steps="$STEPS" --set student.train.amp=fp16
if ((GPUS >= 2)); then
    step train-ddp python -m torch.distributed.run --nproc_per_node 2 --no-python "${FAKD[@]}" \
        train "$RECIPE" --role baseline \
        --out "$OUT/ddp" --set student.train.steps="$STEPS" --set student.train.amp=auto
else
    skip train-ddp "$GPUS GPU visible; DDP needs two"
fi
RUN="$OUT/run"
TRAIN=(--set teacher.train.steps="$STEPS" --set student.train.steps="$STEPS" --set student.train.amp=auto)
if ((ORT)); then
    BACKEND_SET=$(IFS=,; echo "ort-cpu-fp32${GPU_LIST[*]:+,${GPU_LIST[*]}}")
    step pipeline "${FAKD[@]}" run "$RECIPE" --out "$RUN" "${TRAIN[@]}" --set "deploy.backends=[$BACKEND_SET]"
else
    step teacher "${FAKD[@]}" train "$RECIPE" --role teacher --out "$RUN" "${TRAIN[@]}"
    step fakd-step "${FAKD[@]}" distill "$RECIPE" --variant fakd_kd --out "$RUN" "${TRAIN[@]}"
    skip export "onnxruntime is not installed: the export's parity check runs the model on it"
fi

# Deploy: every GPU backend that can run here, on the pipeline's exported model.
ONNX=$(find "$RUN/deploy" -maxdepth 1 -name '*.onnx' ! -name '*.*.onnx' 2> /dev/null | head -n 1)
[[ -n $ONNX ]] || ONNX="$RUN/deploy/fakd_kd.onnx"
STEM=${ONNX%.onnx}
for backend in "${GPU_LIST[@]}"; do
    case $backend in
        trt-*) artifact="$STEM.${backend#trt-}.engine" ;;
        ort-trt-int8) artifact="$STEM.qdq.onnx" ;;
        ort-cuda-fp16) artifact="$STEM.fp16.onnx" ;;
        *) artifact="$ONNX" ;;
    esac
    if [[ ! -e $artifact ]]; then
        step "build-$backend" "${FAKD[@]}" build "$ONNX" --backend "$backend" || continue
    fi
    if step "evaluate-$backend" "${FAKD[@]}" evaluate "$artifact" --backend "$backend" --json "$OUT/evaluate-$backend.json"; then
        ((DRY_RUN)) || GPU_BACKENDS_OK=$((GPU_BACKENDS_OK + 1))
    fi
done
if ((${#GPU_LIST[@]})); then
    step bench "${FAKD[@]}" bench "$RUN" --out "$OUT/bench" --seconds 1 --warmup 0.5
    if [[ $(stack 's["polygraphy"]') == "not installed" ]]; then
        skip polygraphy "not installed (pip install polygraphy)"
    elif [[ " ${GPU_LIST[*]} " != *" trt-fp32 "* ]] || ((!ORT)); then
        skip polygraphy "needs TensorRT and onnxruntime both"
    else
        # Every tensor marked as an output on both sides: the first layer that drifts is named.
        step polygraphy python -m polygraphy run "$ONNX" --onnxrt --trt \
            --onnx-outputs mark all --trt-outputs mark all --atol 1e-3 --rtol 1e-3
    fi
elif ((!TRAINING_ONLY)); then
    record gpu-backends "$( ((DRY_RUN)) && echo 'would fail' || echo FAILED)" 0 \
        "no GPU deploy backend can run here (see the skipped rows above)"
    FAILED=1
fi
if ((!DRY_RUN && !TRAINING_ONLY && GPU_BACKENDS_OK == 0 && ${#GPU_LIST[@]})); then
    record gpu-backends FAILED 0 "a GPU is present but no GPU deploy backend ran to the end"
    FAILED=1
fi

# The report: Markdown and JSON from the stack, the steps and the evaluations.
python - "$OUT" "$FAILED" "$DRY_RUN" "$TRAINING_ONLY" << 'EOF'
import csv, datetime, json, sys
from pathlib import Path

out, failed, dry, training_only = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stack = json.loads((out / "stack.json").read_text())
with open(out / "steps.tsv", newline="") as handle:
    steps = [dict(zip(("step", "status", "seconds", "detail"), row)) for row in csv.reader(handle, delimiter="\t")]
miou = {
    path.stem.removeprefix("evaluate-"): json.loads(path.read_text())["miou"]
    for path in sorted(out.glob("evaluate-*.json"))
}
result = "dry run: nothing ran" if dry else ("FAILED" if failed else "passed")
report = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "mode": "training only" if training_only else "training and deploy",
    "result": result,
    "stack": stack,
    "steps": steps,
    "miou": miou,
}
(out / "report.json").write_text(json.dumps(report, indent=2))
lines = [f"# GPU check ({report['date']}): {result}", "", "## Stack", "", "| | |", "|---|---|"]
for key in ("gpus", "driver", "cuda_driver", "cuda_runtime", "cuda_python", "torch", "torch_cuda", "onnx",
            "onnxruntime", "onnxruntime_providers", "tensorrt", "polygraphy"):
    value = stack.get(key)
    lines.append(f"| {key} | {', '.join(value) if isinstance(value, list) else value} |")
lines += ["", "## Steps", "", "| step | status | s | detail |", "|---|---|---:|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in steps]
lines += ["", "## mIoU per backend", "", "| backend | mIoU |", "|---|---:|"]
lines += [f"| {name} | {value:.2f} |" for name, value in miou.items()] or ["| (none evaluated) | |"]
(out / "report.md").write_text("\n".join(lines) + "\n")
EOF
echo "report: $OUT/report.md, $OUT/report.json"
if ((DRY_RUN)); then exit 0; fi
exit "$FAILED"
