#!/usr/bin/env bash
# `make demo`: the main job on the embedded dataset, start to finish, with the real CLI.
set -euo pipefail
dir="${1:-demo}"
sslcli=".venv/bin/sslcli"

echo "== 1/4 generating the embedded dataset in $dir/data"
"$sslcli" data synth "$dir/data" --train 10000 --test 2000 --size 64 --seed 0 --overwrite
echo "== 2/4 pretraining SimCLR (recipe 'small': ResNet-18 on 32-px crops)"
"$sslcli" pretrain simclr --recipe small --data "$dir/data" --out "$dir/simclr" --overwrite
echo "== 3/4 kNN of a random-init ResNet-18 (the baseline)"
"$sslcli" knn --arch resnet18 --random-init --image-size 32 --crop-pct 1.0 --data "$dir/data" \
    --out "$dir/knn-random.json"
echo "== 4/4 kNN of the SimCLR encoder"
"$sslcli" knn "$dir/simclr" --data "$dir/data" --out "$dir/knn-simclr.json"
.venv/bin/python - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
r = json.load(open(f"{d}/knn-random.json"))["metrics"]["top1"]
s = json.load(open(f"{d}/knn-simclr.json"))["metrics"]["top1"]
print(f"kNN top-1 on the held-out split: random init {r:.1%}  ->  SimCLR {s:.1%}")
PY
