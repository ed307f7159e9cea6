#!/usr/bin/env bash
# Set up (idempotent), then run the main job on the embedded default: demo data -> part files -> UNet
# pretraining on the tiny init (CPU, a few minutes) -> checkpoint, sample images, VisualDL logs -> eval grids.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
sh train.sh
.venv/bin/python eval.py --model_dir sd/tiny_init --unet_path runs/tiny/unet \
  --prompt "a red circle at the top left" --prompt "a blue square in the center" \
  --guidance_scales 1 7.5 --num_inference_steps 20 --height 32 --width 32 --output_dir runs/tiny/eval
echo
echo "checkpoints:    runs/tiny/checkpoint-*/ (unet/ loads with UNet2DConditionModel.from_pretrained)"
echo "final model:    runs/tiny/ is a pipeline folder (StableDiffusionPipeline.from_pretrained(\"runs/tiny\"))"
echo "training samples: runs/tiny/samples/*.png    eval grids: runs/tiny/eval/"
echo "VisualDL:       .venv/bin/visualdl --logdir runs/tiny/runs --host 127.0.0.1 --port 8040"
