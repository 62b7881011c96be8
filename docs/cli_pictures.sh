#!/usr/bin/env bash
# Regenerates the pictures of docs/cli.md by running the commands at small settings
# (a few minutes on two CPU cores; the demo's 400 steps take most of it). Run from the repository root:
#   bash docs/cli_pictures.sh
# The text output of each command is kept next to its pictures (*.txt) and quoted on the page.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/assets/cli
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

# detloss demo: a short SSD run (the default run trains 12 epochs on 1,200 images)
detloss demo --steps 400 --train-images 256 --val-images 32 --threads 2 --no-progress --out "$tmp/demo" \
    | sed "s|$tmp/||" | tee "$out/demo.txt"
cp "$tmp/demo/loss_curve.png" "$out/demo_loss_curve.png"
cp "$tmp/demo/detections.png" "$out/demo_detections.png"

# detloss inspect: an SSD300 image, and the task-aligned assigner of YOLOv8
detloss inspect --preset ssd300-voc --boxes "40,40,120,200,3;130,60,180,110,7;60,150,260,280,12" \
    --out "$out/inspect_ssd300.png" | sed "s|$PWD/||" | tee "$out/inspect_ssd300.txt"
detloss inspect --preset yolov8-640 --boxes "100,100,300,260,1;120,110,290,250,2;400,380,560,600,5" \
    --out "$out/inspect_yolov8.png" | sed "s|$PWD/||" | tee "$out/inspect_yolov8.txt"
detloss inspect --preset yolov8-obb-1024 --boxes "150,150,450,300,1;600,500,900,620,4;300,650,420,900,7" \
    --out "$out/inspect_yolov8_obb.png" | sed "s|$PWD/||" | tee "$out/inspect_yolov8_obb.txt"
detloss inspect --preset retinanet-800 --boxes "100,120,300,400,1;500,200,540,240,2" \
    --out "$out/inspect_retinanet.png" | sed "s|$PWD/||" | tee "$out/inspect_retinanet.txt"
detloss inspect --preset yolov3-416 --boxes "50,60,200,300,0;220,100,260,140,4" \
    --out "$out/inspect_yolov3.png" | sed "s|$PWD/||" | tee "$out/inspect_yolov3.txt"
detloss inspect --preset retinaface-640 --boxes "100,100,180,200,1;300,260,320,285,1" \
    --out "$out/inspect_retinaface.png" | sed "s|$PWD/||" | tee "$out/inspect_retinaface.txt"

# detloss anchors: a synthetic COCO-format data set written by the demo's data module
python - "$tmp" <<'PY'
import sys
from detloss.cli.data import make_synthetic, save_coco
save_coco(make_synthetic(200, image_size=416, seed=0), f"{sys.argv[1]}/ann.json", f"{sys.argv[1]}/img")
PY
detloss anchors --preset yolov3-416 --annotations "$tmp/ann.json" --fit 9 --out "$out/anchors_yolov3.png" \
    | sed "s|$PWD/||; s|$tmp/||" | tee "$out/anchors_yolov3.txt"

# 256-colour palettes: the noisy synthetic backgrounds make the full-colour PNGs ~3x larger
python - "$out" <<'PY'
import glob, sys
from PIL import Image
for path in glob.glob(f"{sys.argv[1]}/*.png"):
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
PY
