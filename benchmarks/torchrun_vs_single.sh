#!/usr/bin/env bash
# Issue 8's check that `sslcli pretrain` under torchrun learns as well as one process: SimCLR `small` on the
# embedded dataset, once in one process and once on 2 gloo ranks (same global batch, hence the same lr), then
# kNN of each encoder on the held-out split.  About 10 minutes on 2 idle CPU cores (plus the dataset, 10 s).
#   bash benchmarks/torchrun_vs_single.sh [WORKDIR]
set -euo pipefail
dir="${1:-/tmp/torchrun-vs-single}"
sslcli=".venv/bin/sslcli"
mkdir -p "$dir"
[ -f "$dir/data/index.json" ] || "$sslcli" data synth "$dir/data" --train 10000 --test 2000 --size 64 --seed 0
/usr/bin/time -f "one process: %e s" "$sslcli" pretrain simclr --recipe small --data "$dir/data" --out "$dir/one" --overwrite
OMP_NUM_THREADS=1 /usr/bin/time -f "two ranks: %e s" .venv/bin/python -m torch.distributed.run --standalone \
    --nproc_per_node=2 -m sslcli pretrain simclr --recipe small --data "$dir/data" --out "$dir/two" --overwrite
"$sslcli" knn "$dir/one" --data "$dir/data" --out "$dir/knn-one.json"
"$sslcli" knn "$dir/two" --data "$dir/data" --out "$dir/knn-two.json"
.venv/bin/python - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
for name in ("one", "two"):
    top1 = json.load(open(f"{d}/knn-{name}.json"))["metrics"]["top1"]
    last = [json.loads(line) for line in open(f"{d}/{name}/metrics.jsonl")][-1]
    print(f"{name}: kNN top-1 {top1:.2%}, last logged loss {last['loss']:.4f} (epoch {last['epoch']}, step {last['step']})")
PY
