"""Where the recipe's checked-in assets live: model configs and the embedded default (the tiny init folder).

One place, so builders, presets, tests and benchmarks never compute a repository root of their own."""
from __future__ import annotations

import os

SD_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SD_DIR)
CONFIGS_DIR = os.path.join(SD_DIR, "configs")
TINY_INIT_DIR = os.path.join(SD_DIR, "tiny_init")
UNET_TINY_CONFIG = os.path.join(CONFIGS_DIR, "unet_tiny.json")
VAE_TINY_CONFIG = os.path.join(CONFIGS_DIR, "vae_tiny.json")
SCHEDULER_SD_V1 = os.path.join(CONFIGS_DIR, "scheduler_sd_v1.json")
