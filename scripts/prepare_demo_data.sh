#!/usr/bin/env sh
# Make the demo dataset (synthetic captioned shapes) and its part files, once: data/demo/.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python}
[ -x .venv/bin/python ] && [ "${PY}" = python ] && PY=.venv/bin/python
OUT=${DEMO_DIR:-data/demo}
N=${DEMO_IMAGES:-2000}
if [ -f "$OUT/filelist/demo.filelist.list" ]; then
  echo "[demo] $OUT is ready"
  exit 0
fi
echo "[demo] generating $N demo images and their part files in $OUT"
"$PY" sd/tiny/make_demo_data.py --output_dir "$OUT/raw" --num_images "$N" --image_size 64 --seed 0
"$PY" create_pretraining_data.py --input_path "$OUT/raw/demo.jsonl" --output_path "$OUT" --output_name demo \
  --per_part_file_num 250 --save_gzip_file
