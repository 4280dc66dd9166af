#!/usr/bin/env bash
# Every CPU figure of docs/benchmarks.md's "Performance (issue 10)" section, in one go. Run it on an otherwise
# idle machine (other jobs on the cores make every figure an upper bound; each results file records the load
# average at its start and end):
#
#     bash benchmarks/run_cpu_figures.sh [DATA_DIR]          # STEPS=20 ROUNDS=3 by default
#
# On a machine shared with other jobs, THREADS=1 avoids OpenMP's spin-waits for a descheduled second thread
# (docs/benchmarks.md), at the price of figures for one thread.
#
# Writes benchmarks/results/throughput-cpu-<method>.json and optimisations-cpu.json, then prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:-/tmp/sslcli-bench-data}
STEPS=${STEPS:-20}    # timed batches per phase of benchmarks.throughput
ROUNDS=${ROUNDS:-3}   # alternations of before / after in benchmarks.optimisations
THREADS=${THREADS:-}  # intra-op threads; empty: torch's default (one per core)
OUT=${OUT:-benchmarks/results}
PY=${PY:-.venv/bin/python}
start=$SECONDS

# The embedded dataset at 64 px (10,000 train images: 78 batches of 128, enough for one epoch per phase).
[ -f "$DATA/index.json" ] || "$PY" -m sslcli data synth "$DATA" --train 10000 --test 200 --size 64 --seed 0

# Each method's small recipe with 64-px global crops (DINO's local crops at 32 px, about the paper's 96/224),
# fp32 (the CPU default), the engine's default memory format and optimiser.
for method in simclr mocov2 byol dino mae; do
    extra=()
    if [ "$method" = dino ]; then extra=(--local-size 32); fi
    "$PY" -m benchmarks.throughput --method "$method" --recipe small --data "$DATA" --global-size 64 "${extra[@]}" \
        --device cpu --precision fp32 --workers 0,1,2 --e2e-workers 1,2 --steps "$STEPS" ${THREADS:+--threads "$THREADS"} \
        --out "$OUT/throughput-cpu-$method.json" > /dev/null
    echo "$method done ($((SECONDS - start)) s)"
done

"$PY" -m benchmarks.optimisations --data "$DATA" --device cpu --rounds "$ROUNDS" --steps "$((STEPS / 2))" \
    ${THREADS:+--threads "$THREADS"} \
    --out "$OUT/optimisations-cpu.json"

"$PY" -m benchmarks.throughput_report "$OUT"/throughput-cpu-{simclr,mocov2,byol,dino,mae}.json "$OUT/optimisations-cpu.json"
echo "all figures in $((SECONDS - start)) s"
