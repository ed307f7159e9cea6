"""Export a training checkpoint (or a finished run) for PyTorch tools: a diffusers pipeline folder and/or the
original Stable Diffusion single-file safetensors that ComfyUI and AUTOMATIC1111 load.

    python export_model.py --checkpoint runs/x/checkpoint-500 --model_dir sd/tiny_init --output_path exports/x
    python export_model.py --checkpoint runs/x --model_dir ./CompVis-stable-diffusion-v1-4 --use_ema \
        --format original --dtype float16 --output_path exports/x-ema-fp16

Writes OUTPUT_PATH/diffusers/ (StableDiffusionPipeline.from_pretrained loads it), OUTPUT_PATH/model.safetensors
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.* keys) and
OUTPUT_PATH/export_config.json. --model_dir supplies the parts the run did not train (vae/, tokenizer/, and
text_encoder/ unless the checkpoint holds a trained one). Only safetensors weights are read. The flags are the
fields of sd/export.py's ExportArguments (a single .json argument holding them works too).
"""
from sd.export import main

if __name__ == "__main__":
    main()
