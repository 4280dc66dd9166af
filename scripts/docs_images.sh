#!/usr/bin/env bash
# `make docs-images`: the images shown in docs/, made with the real CLI on the embedded dataset.
set -euo pipefail
dir="${1:-demo}"
sslcli=".venv/bin/sslcli"
[ -f "$dir/data/index.json" ] || "$sslcli" data synth "$dir/data" --train 10000 --test 2000 --size 64 --seed 0
echo "== MAE (recipe 'small': ViT-Tiny/8 on 64-px crops, 75% masked)"
"$sslcli" pretrain mae --recipe small --data "$dir/data" --out "$dir/mae" --overwrite
"$sslcli" reconstruct "$dir/mae" "$dir/data" --split test --limit 6 --seed 0 --zoom 3 --out "$dir/mae-recon"
mkdir -p docs/images
.venv/bin/python - "$dir/mae-recon" docs/images/mae_reconstructions.png <<'PY'
import sys
from pathlib import Path
from PIL import Image
rows = [Image.open(p) for p in sorted(Path(sys.argv[1]).glob("*.png"))]
sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 4 * (len(rows) - 1)), "white")
for i, row in enumerate(rows):
    sheet.paste(row, (0, i * (row.height + 4)))
sheet.save(sys.argv[2])
print(f"wrote {sys.argv[2]} ({len(rows)} images)")
PY
cp "$dir/mae-recon/reconstruct.json" docs/images/mae_reconstructions.json
