#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md's "Performance (issue 10)" section, in one prepared run sized for a
# lent H100/H200 (about 8 minutes; device time is scarce, so nothing here is optional):
#
#     bash benchmarks/run_gpu_figures.sh "$OUT"              # on the device machine, from the repo root
#
# Leaves OUT_DIR/report.md (the tables) and OUT_DIR/gpu-figures.tar.gz (every JSON and log), both rewritten
# after each benchmark, so a run stopped at the device tool's limit still returns what it finished.
#
# - the model step of the paper recipes in bf16 with torch.compile, on synthetic device tensors: ViT-B/16
#   MAE and MoCo v3 at 224 px, DINO ViT-B/16 with 2 x 224 + 10 x 96 crops, ResNet-50 SimCLR and BYOL;
#   img/s, peak memory, FLOPs of the exact step and MFU against the measured dense bf16 matmul rate;
# - the data pipeline on the host's cores with 224-px JPEG shards, per worker count, and MAE end to end with
#   worker-side augmentation against --augment-on device (nvJPEG decoding, batched augmentation on the GPU);
# - the batched augmentation alone against one worker's per-image path, and chunked InfoNCE at K = 65,536.
#
# PY defaults to python3 with the repo on PYTHONPATH. The device image has torch, torchvision, timm, typer,
# rich, safetensors, pyyaml and pillow, but not braceexpand (the shard reader's one other import) and no
# package index. Carry its wheel: once, in the checkout,
#
#     echo /.whl/ >> .git/info/exclude && pip download --no-deps --only-binary=:all: -d .whl braceexpand==0.1.7
#
# and run with `carry: [".whl"]`; wheels found in .whl/ are installed to a scratch folder on PYTHONPATH.
# A preflight import of every module the run uses fails in seconds, not after the data is built.
# SMOKE=1 runs the same commands with tiny models and sizes, to check the script on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: run_gpu_figures.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" -c "import sslcli.cli.app, sslcli.data.reader, benchmarks.throughput, benchmarks.device_augment, \
benchmarks.chunked_info_nce, benchmarks.throughput_report, PIL" \
    || { echo "preflight: a module above does not import; carry its wheel in .whl/ (see the header)"; exit 2; }
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-/tmp/sslcli-gpu-data}
RAW=$(mktemp -d)  # JSONs and logs; $OUT only ever holds the archive and the report (the tool returns 8 files)
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*"; }

if [ "${SMOKE:-0}" = 1 ]; then
    SIZE=32 LOCAL=16 N=256 STEPS=2 WARM=1 BATCH=16 VIT=vit_tiny_p8 CNN=resnet18 WORKERS=0,1 PREC=fp32 COMPILE=
else
    SIZE=224 LOCAL=96 N=4096 STEPS=${STEPS:-10} WARM=${WARM:-3} BATCH= VIT=vit_b16 CNN=resnet50 \
        WORKERS=${WORKERS:-4,8,14} PREC=bf16 COMPILE=--compile
fi
LIMIT=${LIMIT:-170}  # seconds per benchmark: one stuck compile must not cost the rest

pack() {  # the archive and report of everything finished so far, replaced atomically: a kill keeps them
    "$PY" -m benchmarks.throughput_report "$RAW"/tp-*.json > "$RAW/report.md" 2> "$RAW/report.log" || true
    tar -czf "$OUT/.gpu-figures.tar.gz" -C "$RAW" . && mv "$OUT/.gpu-figures.tar.gz" "$OUT/gpu-figures.tar.gz"
    cp "$RAW/report.md" "$OUT/report.md"
}
step() {  # NAME COMMAND...: one benchmark under the time limit, its output to $RAW/NAME.log
    local name=$1; shift
    timeout "$LIMIT" "$@" > "$RAW/$name.log" 2>&1 && log "$name done" || log "$name FAILED or timed out ($name.log)"
    pack
}
bench() {  # NAME DATA ARGS...: one benchmarks.throughput run, its JSON to $RAW/NAME.json
    local name=$1 data=$2; shift 2
    step "$name" "$PY" -m benchmarks.throughput --data "$data" --device "$DEVICE" --steps "$STEPS" --warmup "$WARM" \
        ${BATCH:+--batch-size "$BATCH"} --out "$RAW/$name.json" "$@"
}

# The model step only reads the data's size: a small PNG set, made in seconds. The 224-px JPEG shards for
# the pipeline (quality 90: the embedded data rendered at 224 px, re-encoded) build in the background meanwhile.
[ -f "$DATA-small/index.json" ] || "$PY" -m sslcli data synth "$DATA-small" --train 512 --test 64 --size 32 --seed 0 > /dev/null
build_jpeg_shards() {
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
}
if [ ! -f "$DATA/index.json" ]; then
    build_jpeg_shards > "$RAW/data.log" 2>&1 &
    data_job=$!
fi
log "small data ready; JPEG shards building in the background"

# Model step, bf16 + compile, the paper recipes (the batch: the recipe's per-GPU share, or BATCH in SMOKE mode).
bench tp-mae-vitb16 "$DATA-small" --method mae --recipe paper --arch "$VIT" --global-size "$SIZE" --precision "$PREC" \
    $COMPILE --phases model,flops --batch-size "${BATCH:-256}"
bench tp-mocov3-vitb16 "$DATA-small" --method mocov3 --recipe paper --arch "$VIT" --global-size "$SIZE" \
    --precision "$PREC" $COMPILE --phases model,flops --batch-size "${BATCH:-128}"
bench tp-dino-vitb16 "$DATA-small" --method dino --recipe paper --arch "$VIT" --global-size "$SIZE" \
    --local-size "$LOCAL" --precision "$PREC" $COMPILE --phases model,flops --batch-size "${BATCH:-64}"
bench tp-simclr-rn50 "$DATA-small" --method simclr --recipe paper --arch "$CNN" --global-size "$SIZE" \
    --precision "$PREC" $COMPILE --phases model,flops --batch-size "${BATCH:-256}"
bench tp-byol-rn50 "$DATA-small" --method byol --recipe paper --arch "$CNN" --global-size "$SIZE" \
    --precision "$PREC" $COMPILE --phases model,flops --batch-size "${BATCH:-256}"
if [ -n "${data_job:-}" ]; then
    wait "$data_job" && log "JPEG shards ready: $DATA" || { log "JPEG shards FAILED (data.log)"; pack; exit 1; }
fi
# The pipeline on the host's cores, and MAE end to end: worker-side against device-side augmentation.
bench tp-mae-pipeline "$DATA" --method mae --recipe paper --arch "$VIT" --global-size "$SIZE" --precision "$PREC" \
    --phases data,e2e --workers "$WORKERS" --e2e-workers "${WORKERS##*,}" --batch-size "${BATCH:-256}"
bench tp-mae-pipeline-device "$DATA" --method mae --recipe paper --arch "$VIT" --global-size "$SIZE" \
    --precision "$PREC" --augment-on device --phases data,e2e --workers "${WORKERS##*,}" \
    --e2e-workers "${WORKERS##*,}" --batch-size "${BATCH:-256}"
step gpu-device-augment "$PY" -m benchmarks.device_augment --method dino --recipe paper --size "$SIZE" --format jpeg \
    --batch "${BATCH:-256}" --device "$DEVICE" --out "$RAW/gpu-device-augment.json"
step gpu-chunked-info-nce "$PY" -m benchmarks.chunked_info_nce --n 256 --k 65536 --dim 128 --chunk 8192 \
    --device "$DEVICE" --out "$RAW/gpu-chunked-info-nce.json"
log "all done: $OUT/report.md, $OUT/gpu-figures.tar.gz"
