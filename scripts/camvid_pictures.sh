#!/usr/bin/env bash
# The CamVid pictures of docs/deploy.md, from a CamVid run folder, through the CLI only:
#   docs/img/camvid_compare.png  the comparison grid of `bench --compare 3` (image, ground truth,
#                                the reference row, each backend, differing pixels in magenta)
#   docs/img/camvid_overlay.png  `predict` of the picked engine on the first validation image,
#                                blended over it with the legend of the classes present
#
#   bash scripts/camvid_pictures.sh RUN [CAMVID_ROOT]     # CAMVID_ROOT: ../shared/datasets/camvid
#
# RUN is a folder written by `fakd-deploy run` on a CamVid recipe (recipes/camvid_cpu.yaml,
# recipes/camvid_study.yaml, ...). The bench report in RUN is rewritten.
set -euo pipefail

RUN=${1:?usage: bash scripts/camvid_pictures.sh RUN [CAMVID_ROOT]}
ROOT=${2:-../shared/datasets/camvid}
OUT=docs/img
mkdir -p "$OUT"

fakd-deploy bench "$RUN" --compare 3 --pick
cp "$RUN/report.compare.png" "$OUT/camvid_compare.png"

PICKED=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["file"])' "$RUN/deploy/choice.json")
IMAGE=$(head -n 1 "$ROOT/val.txt" | cut -d' ' -f1)
PREDICTIONS=$(mktemp -d)
trap 'rm -rf "$PREDICTIONS"' EXIT
fakd-deploy predict "$RUN/$PICKED" "$ROOT/${IMAGE#/}" --out "$PREDICTIONS"
cp "$PREDICTIONS"/*.overlay.png "$OUT/camvid_overlay.png"
echo "wrote $OUT/camvid_compare.png and $OUT/camvid_overlay.png"
