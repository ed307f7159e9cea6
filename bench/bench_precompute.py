"""Precompute throughput and storage: records/s per process and bytes per record of precompute_latents.py's
shards, at 256 and 512 px, with SD v1.x-shaped components, and the LAION-400M storage they imply.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_precompute.py [--records 4] [--resolutions 256 512]  (~15 min)

Components: an AutoencoderKL with SD v1's config (128/256/512/512 channels, 2 layers a block, factor 8, 4 latent
channels) and a CLIPTextModel with SD v1's (hidden 768, 12 layers, 77 tokens), randomly initialised (bytes and
time do not depend on the weights), the real CLIP tokenizer of sd/tiny_init, demo images of the resolution's
size. It runs the stage's own code in this process (resolve, Encoder, encode_shard; model loading not timed),
once with text embeddings and the mirrored moments (the largest record) and once with token ids only and no
flip (the smallest), in float16. (The training half of the benchmark, steps/s from latents vs from images, is
added beside this one.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

LAION_400M = 400_000_000
SHARD_RECORDS = 1000  # the data tool's default --per_part_file_num: one part, one shard
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
SD_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408, "hidden_act": "quick_gelu"}


def build_init(folder: str) -> str:
    """An init folder of SD v1-shaped components (random weights) and the real tokenizer."""
    import shutil

    import paddle
    from ppdiffusers import AutoencoderKL
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel
    from sd.paths import TINY_INIT_DIR, UNET_TINY_CONFIG

    paddle.seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(**SD_TEXT)).save_pretrained(os.path.join(folder, "text_encoder"),
                                                            safe_serialization=True)
    shutil.copytree(os.path.join(TINY_INIT_DIR, "tokenizer"), os.path.join(folder, "tokenizer"))
    shutil.copy(UNET_TINY_CONFIG, os.path.join(folder, "unet_config.json"))
    return folder


def measure(file_list: str, init: str, out: str, resolution: int, full: bool) -> dict:
    from data_tools.latent_format import LatentShard
    from sd.precompute import Encoder, PrecomputeArguments, encode_shard, resolve
    from trainer.loader.transforms import ImageTransform

    args = PrecomputeArguments(file_list=file_list, output_path=out, pretrained_model_name_or_path=init,
                               resolution=resolution, random_flip=full, text_embeddings=full,
                               latent_dtype="float16", batch_size=4)
    run = resolve(args)
    os.makedirs(run.shards_dir, exist_ok=True)
    enc, transform = Encoder(run), ImageTransform(run.data)
    t0 = time.perf_counter()
    entries = [encode_shard(run, enc, transform, i, None) for i in range(len(run.distinct_parts))]
    seconds = time.perf_counter() - t0
    records = sum(e["records"] for e in entries)
    # A record's own bytes (its rows, its caption) and what a shard pays once (header, empty_* tensors), so the
    # estimate holds for shards of any size, not only for this benchmark's small ones.
    per_record = 0
    for e in entries:
        with LatentShard(e["path"]) as shard:
            per_record += sum(shard.nbytes(k) for k in shard.keys if not k.startswith("empty_"))
    overhead = (sum(e["bytes"] for e in entries) - per_record) / len(entries)
    return {"resolution": resolution, "text_embeddings": full, "random_flip": full, "records": records,
            "records_per_s": records / seconds, "bytes_per_record": per_record / records,
            "bytes_per_shard": overhead}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=4, help="records per resolution and setting")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    opts = ap.parse_args(argv)
    from sd.tiny.make_demo_data import make_demo_parts

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init = build_init(os.path.join(tmp, "init"))
        for res in opts.resolutions:
            data = make_demo_parts(os.path.join(tmp, f"data{res}"), opts.records, image_size=res,
                                   per_part=opts.records)
            for full in (True, False):
                rows.append(measure(data, init, os.path.join(tmp, f"out{res}{full}"), res, full))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nper process, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, float16 storage:")
    print(f"| px | stored | records/s | bytes/record (+ per shard) | LAION-400M ({SHARD_RECORDS}-record shards) |")
    print("|---|---|---|---|---|")
    for r in rows:
        what = "moments + mirrored moments + text embeddings [77, 768]" if r["text_embeddings"] else \
            "moments + token ids"
        total = r["bytes_per_record"] * LAION_400M + r["bytes_per_shard"] * LAION_400M / SHARD_RECORDS
        print(f"| {r['resolution']} | {what} | {r['records_per_s']:.3f} | {r['bytes_per_record']:,.0f} "
              f"(+ {r['bytes_per_shard']:,.0f}) | {total / 1e12:.1f} TB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
