"""Steps/s of train.py's Trainer from a latent dataset (precompute_latents.py) against the same training from the
images, in the same run. Target: >= 1.25x on the tiny default (issue 15).

    .venv/bin/python bench/bench_train_from_latents.py [--steps 40] [--warmup 8] [--batch_size 16] \
        [--latent_dtype float16] [--text_embeddings True] [--sd_shaped] [--resolution 32] [--workers 0] [--rounds 2]

Both sides run the recipe as a user does (resolve_train, train.build_trainer, Trainer.train) with the same seed,
flags and data: demo images made by the data tool (64 px, center crop to --resolution), and their latents made
by precompute_latents.py in a subprocess (its wall time is printed too). The image side decodes, resizes, crops
and runs the VAE (and text encoder) every step; the latent side reads the cached moments (and embeddings).
--sd_shaped swaps the tiny init for an SD1.x-shaped but narrow UNet and VAE (SD v1's block layout: 4 down/up
blocks, cross-attention in 3, 2 layers per block, a VAE that downsamples by 8), random weights, built in the
temporary folder, with the tiny text encoder and tokenizer. The two sides alternate for --rounds rounds (a shared
machine's load drifts); each round's medians are printed and the ratio is of the best median of each side, in
wall time and in this process's CPU time (what another process's load on a shared machine disturbs least).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from timed_training import timed_recipe_run, train_argv


def sd_shaped_init(folder: str) -> str:
    """An init folder shaped as SD v1 (block layout, VAE factor 8), narrow enough for a CPU."""
    from ppdiffusers import AutoencoderKL
    from sd.paths import TINY_INIT_DIR

    os.makedirs(folder)
    for name in ("text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(TINY_INIT_DIR, name), os.path.join(folder, name))
    shutil.copy(os.path.join(TINY_INIT_DIR, "model_index.json"), folder)
    with open(os.path.join(TINY_INIT_DIR, "text_encoder", "config.json"), encoding="utf-8") as f:
        text_dim = json.load(f)["hidden_size"]
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16, 32, 64, 64), sample_size=64)
    vae.save_pretrained(os.path.join(folder, "vae"))
    unet = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [32, 64, 96, 96], "cross_attention_dim": text_dim, "center_input_sample": False,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 8, "out_channels": 4,
            "sample_size": 8, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    with open(os.path.join(folder, "unet_config.json"), "w", encoding="utf-8") as f:
        json.dump(unet, f, indent=1)
    return folder


def precompute(file_list: str, init: str, out: str, opts) -> str:
    cmd = [sys.executable, "precompute_latents.py", "--file_list", file_list, "--pretrained_model_name_or_path", init,
           "--resolution", str(opts.resolution), "--latent_dtype", opts.latent_dtype,
           "--text_embeddings", str(opts.text_embeddings), "--output_path", out, "--output_name", "bench"]
    from sd.paths import REPO_ROOT

    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"precompute: {time.perf_counter() - t0:.1f} s  ({' '.join(cmd[1:])})", flush=True)
    return os.path.join(out, "filelist", "bench.filelist.list")


def step_times(init: str, file_list: str, out_dir: str, opts):
    timer, _ = timed_recipe_run(train_argv(init, file_list, out_dir, opts.resolution, opts.batch_size, opts.steps,
                                           opts.workers))
    return statistics.median(timer.times[opts.warmup:]), statistics.median(timer.cpu[opts.warmup:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--latent_dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--text_embeddings", default="True", choices=["True", "False"])
    p.add_argument("--sd_shaped", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="Alternated image/latent runs; the best median of each")
    opts = p.parse_args()
    print("command: .venv/bin/python bench/bench_train_from_latents.py " + " ".join(sys.argv[1:]), flush=True)
    from sd.paths import TINY_INIT_DIR
    from sd.tiny.make_demo_data import make_demo_parts

    with tempfile.TemporaryDirectory() as tmp:
        init = sd_shaped_init(os.path.join(tmp, "init")) if opts.sd_shaped else TINY_INIT_DIR
        images = make_demo_parts(os.path.join(tmp, "data"), 256, image_size=64, per_part=64)
        latents = precompute(images, init, os.path.join(tmp, "latents"), opts)
        rounds = []
        for r in range(opts.rounds):  # alternated: a machine whose load drifts biases neither side
            a = step_times(init, images, os.path.join(tmp, f"run_images{r}"), opts)
            b = step_times(init, latents, os.path.join(tmp, f"run_latents{r}"), opts)
            rounds.append((a, b))
            print(f"round {r + 1}: images {a[0]:.4f} s/step ({a[1]:.4f} CPU), latents {b[0]:.4f} s/step "
                  f"({b[1]:.4f} CPU), {a[0] / b[0]:.2f}x", flush=True)
    a, b = min(x[0] for x, _ in rounds), min(y[0] for _, y in rounds)
    ac, bc = min(x[1] for x, _ in rounds), min(y[1] for _, y in rounds)
    print(f"\n{'':34}{'median s/step':>14}{'steps/s':>9}{'CPU s/step':>11}")
    print(f"{'from images (loader + VAE + text)':34}{a:>14.4f}{1 / a:>9.2f}{ac:>11.4f}")
    print(f"{'from latents (' + opts.latent_dtype + ')':34}{b:>14.4f}{1 / b:>9.2f}{bc:>11.4f}")
    print(f"speed-up from the cache: {a / b:.2f}x wall, {ac / bc:.2f}x CPU (target >= 1.25x), "
          f"{'SD1.x-shaped' if opts.sd_shaped else 'tiny'} "
          f"init, batch {opts.batch_size}, {opts.resolution} px, {opts.steps} steps, first {opts.warmup} excluded, "
          f"workers {opts.workers}, text embeddings {opts.text_embeddings}")


if __name__ == "__main__":
    main()
