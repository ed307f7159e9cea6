#!/usr/bin/env sh
# Make the demo dataset (synthetic captioned shapes), its part files and their latents, in data/demo/:
#   raw/ (jsonl + PNGs) -> part files (create_pretraining_data.py) -> latents/ (precompute_latents.py, the tiny
#   init's VAE posterior and text embeddings at the preset's resolution: training skips both encoders).
# Parts are made once. The precompute runs every time with --resume: it keeps the shards that still match the
# parts and the tiny init (sha256), so it costs a few seconds when nothing changed and re-encodes what did.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python}
[ -x .venv/bin/python ] && [ "${PY}" = python ] && PY=.venv/bin/python
OUT=${DEMO_DIR:-data/demo}
N=${DEMO_IMAGES:-2000}
RES=${DEMO_RESOLUTION:-32}
if [ -f "$OUT/filelist/demo.filelist.list" ]; then
  echo "[demo] $OUT part files are ready"
else
  echo "[demo] generating $N demo images and their part files in $OUT"
  "$PY" sd/tiny/make_demo_data.py --output_dir "$OUT/raw" --num_images "$N" --image_size 64 --seed 0
  "$PY" create_pretraining_data.py --input_path "$OUT/raw/demo.jsonl" --output_path "$OUT" --output_name demo \
    --per_part_file_num 250 --save_gzip_file
fi
[ "${DEMO_LATENTS:-1}" = 1 ] || exit 0
echo "[demo] latents of $OUT at ${RES} px (sd/tiny_init's VAE and text encoder) in $OUT/latents"
"$PY" precompute_latents.py --file_list "$OUT/filelist/demo.filelist.list" --pretrained_model_name_or_path sd/tiny_init \
  --resolution "$RES" --center_crop True --latent_dtype float16 --output_path "$OUT/latents" --output_name demo \
  --resume True
