"""Where the recipe's checked-in assets live: model configs and the embedded default (the tiny init folder).

One place, so builders, presets, tests and benchmarks never compute a repository root of their own."""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

SD_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SD_DIR)
CONFIGS_DIR = os.path.join(SD_DIR, "configs")
TINY_INIT_DIR = os.path.join(SD_DIR, "tiny_init")
UNET_TINY_CONFIG = os.path.join(CONFIGS_DIR, "unet_tiny.json")
VAE_TINY_CONFIG = os.path.join(CONFIGS_DIR, "vae_tiny.json")
SCHEDULER_SD_V1 = os.path.join(CONFIGS_DIR, "scheduler_sd_v1.json")


def import_entry(name: str) -> ModuleType:
    """A root entry point (train.py, ...) as a module, for benchmarks that reuse what the job builds: loaded from
    its file, since the root is not a package and nothing edits sys.path."""
    spec = importlib.util.spec_from_file_location(f"_entry_{name}", os.path.join(REPO_ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
