"""scripts/default_figures.py: an experiment row is the committed preset with a few flags replaced, and every row
of sd/configs/tiny_experiments.json names flags that train.py accepts."""
import json
import os
import shlex

import pytest

from helpers import ROOT
from sd.config import parse_args

pytestmark = pytest.mark.unit


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_figures", os.path.join(ROOT, "scripts", "default_figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preset_flags_replace_drop_and_append():
    figures = load_script()
    base = figures.preset_flags({})
    preset = [tok for line in open(figures.PRESET) if line.strip() and not line.startswith("#")
              for tok in shlex.split(line)]
    assert base == preset
    changed = figures.preset_flags({"max_steps": 10, "lr_scheduler_type": None, "snr_gamma": 5,
                                    "sample_prompts": ["a", "b c"]})
    assert changed[changed.index("--max_steps") + 1] == "10" and changed.count("--max_steps") == 1
    assert "--lr_scheduler_type" not in changed
    assert changed[-5:] == ["--snr_gamma", "5", "--sample_prompts", "a", "b c"]


def test_every_experiment_row_parses_as_train_flags():
    from sd.args import DataArguments, ModelArguments, SDTrainingArguments

    figures = load_script()
    rows = json.load(open(os.path.join(ROOT, "sd", "configs", "tiny_experiments.json")))["rows"]
    assert len({r["name"] for r in rows}) == len(rows)
    for row in rows:
        flags = figures.preset_flags({**row["flags"], "output_dir": "/nonexistent/run", "file_list": __file__})
        model, data, training = parse_args((ModelArguments, DataArguments, SDTrainingArguments), flags)
        for name, value in row["flags"].items():
            got = {**vars(model), **vars(data), **vars(training)}[name]
            got = getattr(got, "value", got)  # enums (lr_scheduler_type) compare by value
            assert (float(got) == float(value) if isinstance(value, (int, float)) else got == value), (row, got)
