#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md's "Performance (issue 10)" section, in one prepared run sized for a
# lent H100/H200 (about 8 minutes; device time is scarce, so nothing here is optional):
#
#     bash benchmarks/run_gpu_figures.sh "$OUT"              # on the device machine, from the repo root
#
# Leaves OUT_DIR/report.md (the tables) and OUT_DIR/gpu-figures.tar.gz (every JSON and log).
#
# - the model step of the paper recipes in bf16 with torch.compile, on synthetic device tensors: ViT-B/16
#   MAE and MoCo v3 at 224 px, DINO ViT-B/16 with 2 x 224 + 10 x 96 crops, ResNet-50 SimCLR and BYOL;
#   img/s, peak memory, FLOPs of the exact step and MFU against the measured dense bf16 matmul rate;
# - the data pipeline on the host's cores with 224-px JPEG shards, per worker count, and MAE end to end with
#   worker-side augmentation against --augment-on device (nvJPEG decoding, batched augmentation on the GPU);
# - the batched augmentation alone against one worker's per-image path, and chunked InfoNCE at K = 65,536.
#
# PY defaults to python3 with the repo on PYTHONPATH (the device image has torch, timm, typer, rich and
# safetensors). SMOKE=1 runs the same commands with tiny models and sizes, to check the script on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: run_gpu_figures.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-/tmp/sslcli-gpu-data}
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*"; }

if [ "${SMOKE:-0}" = 1 ]; then
    SIZE=32 LOCAL=16 N=256 STEPS=2 WARM=1 BATCH=16 VIT=vit_tiny_p8 CNN=resnet18 WORKERS=0,1 PREC=fp32 COMPILE=
else
    SIZE=224 LOCAL=96 N=4096 STEPS=${STEPS:-10} WARM=${WARM:-3} BATCH= VIT=vit_b16 CNN=resnet50 \
        WORKERS=${WORKERS:-4,8,14} PREC=bf16 COMPILE=--compile
fi

# 224-px JPEG shards (quality 90): the embedded data rendered at 224 px, re-encoded as JPEG files.
if [ ! -f "$DATA/index.json" ]; then
    "$PY" -m sslcli data synth "$DATA-png" --train "$N" --test 64 --size "$SIZE" --seed 0 > /dev/null
    "$PY" - "$DATA-png" "$DATA-jpg" <<'PYEOF'
import io, sys, tarfile
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for shard in sorted(src.glob("train-*.tar")):
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png") and "." not in member.name[:-4].split("/")[-1]:
                key = member.name[:-4]
                label = tar.extractfile(f"{key}.cls").read().decode().strip()
                folder = dst / "train" / label
                folder.mkdir(parents=True, exist_ok=True)
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                image.save(folder / f"{Path(key).name}.jpg", quality=90)
PYEOF
    "$PY" -m sslcli data shards "$DATA-jpg" "$DATA" --shard-size 1000 > /dev/null
fi
log "data ready: $DATA"

bench() {  # NAME ARGS...: one benchmarks.throughput run, its JSON to $OUT/NAME.json
    local name=$1; shift
    "$PY" -m benchmarks.throughput --data "$DATA" --device "$DEVICE" --steps "$STEPS" --warmup "$WARM" \
        ${BATCH:+--batch-size "$BATCH"} --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
        && log "$name done" || log "$name FAILED (see $OUT/$name.log)"
}
# Model step, bf16 + compile, the paper recipes (the batch: the recipe's per-GPU share, or BATCH in SMOKE mode).
bench tp-mae-vitb16 --method mae --recipe paper --arch "$VIT" --global-size "$SIZE" --precision "$PREC" \
    $COMPILE --phases model,flops --batch-size "${BATCH:-256}"
bench tp-mocov3-vitb16 --method mocov3 --recipe paper --arch "$VIT" --global-size "$SIZE" --precision "$PREC" \
    $COMPILE --phases model,flops --batch-size "${BATCH:-128}"
bench tp-dino-vitb16 --method dino --recipe paper --arch "$VIT" --global-size "$SIZE" --local-size "$LOCAL" \
    --precision "$PREC" $COMPILE --phases model,flops --batch-size "${BATCH:-64}"
bench tp-simclr-rn50 --method simclr --recipe paper --arch "$CNN" --global-size "$SIZE" --precision "$PREC" \
    $COMPILE --phases model,flops --batch-size "${BATCH:-256}"
bench tp-byol-rn50 --method byol --recipe paper --arch "$CNN" --global-size "$SIZE" --precision "$PREC" \
    $COMPILE --phases model,flops --batch-size "${BATCH:-256}"
# The pipeline on the host's cores, and MAE end to end: worker-side against device-side augmentation.
bench tp-mae-pipeline --method mae --recipe paper --arch "$VIT" --global-size "$SIZE" --precision "$PREC" \
    --phases data,e2e --workers "$WORKERS" --e2e-workers "${WORKERS##*,}" --batch-size "${BATCH:-256}"
bench tp-mae-pipeline-device --method mae --recipe paper --arch "$VIT" --global-size "$SIZE" --precision "$PREC" \
    --augment-on device --phases data,e2e --workers "${WORKERS##*,}" --e2e-workers "${WORKERS##*,}" \
    --batch-size "${BATCH:-256}"
"$PY" -m benchmarks.device_augment --method dino --recipe paper --size "$SIZE" --format jpeg \
    --batch "${BATCH:-256}" --device "$DEVICE" --out "$OUT/gpu-device-augment.json" > "$OUT/gpu-device-augment.log" 2>&1 \
    && log "device_augment done" || log "device_augment FAILED"
"$PY" -m benchmarks.chunked_info_nce --n 256 --k 65536 --dim 128 --chunk 8192 --device "$DEVICE" \
    --out "$OUT/gpu-chunked-info-nce.json" > "$OUT/gpu-chunked-info-nce.log" 2>&1 \
    && log "chunked_info_nce done" || log "chunked_info_nce FAILED"
"$PY" -m benchmarks.throughput_report "$OUT"/tp-*.json > "$OUT/report.md" 2>&1 || log "report FAILED"
# The device tool returns at most 8 files: everything goes back in one archive, the report beside it.
tar -czf "$OUT/gpu-figures.tar.gz" -C "$OUT" --exclude gpu-figures.tar.gz --exclude report.md .
find "$OUT" -type f ! -name gpu-figures.tar.gz ! -name report.md -delete
log "all done: $OUT/report.md, $OUT/gpu-figures.tar.gz"
