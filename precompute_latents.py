#!/usr/bin/env python
"""Encode a dataset once: VAE posterior moments and text embeddings of its training crops, as a latent dataset.

    python precompute_latents.py --file_list OUT/filelist/NAME.filelist.list --pretrained_model_name_or_path DIR \
        --resolution 256 --random_flip True --output_path LATENTS --output_name NAME
    python -m paddle.distributed.launch --nproc_per_node 2 precompute_latents.py ...   (same flags, one rank each)

writes LATENTS/latents/NAME/shard-XXXXXX.safetensors, LATENTS/filelist/NAME.filelist[.list] (what `sh train.sh
--file_list` takes), LATENTS/NAME.manifest.json, LATENTS/NAME.rejects.jsonl, LATENTS/NAME.precompute_config.json.
The flags: sd/precompute.py (`--help` lists them); the run: sd/precompute_run.py; the format and its reader:
data_tools/latent_format.py.
"""
import sys

from sd.precompute_run import main

if __name__ == "__main__":
    sys.exit(main())
