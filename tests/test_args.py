"""Typed arguments: explicit init choice, clear errors for bad paths and values, device notices, resume rules."""
import json
import os
import shutil

import pytest
from paddlenlp.trainer import PdArgumentParser

from helpers import TINY_INIT
from sd.args import DataArguments, ModelArguments, SDTrainingArguments
from sd.device import resolve_model_features
from trainer.entry import resolve_checkpoint

pytestmark = pytest.mark.unit


def parse(*argv):
    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    return parser.parse_args_into_dataclasses(args=list(argv))


@pytest.fixture()
def file_list(tmp_path):
    path = tmp_path / "x.filelist.list"
    path.write_text("x.filelist\n")
    return str(path)


def base(file_list, out, *extra):
    return ["--output_dir", str(out), "--file_list", file_list, "--max_steps", "5", "--logging_steps", "1",
            "--pretrained_model_name_or_path", TINY_INIT, *extra]


def test_init_folder_means_unet_from_its_config(tmp_path, file_list):
    model, data, training = parse(*base(file_list, tmp_path / "o"))
    assert model.unet_from_config and model.unet_path.endswith("unet_config.json")
    assert model.vae_path == os.path.join(TINY_INIT, "vae") and model.tokenizer_path.endswith("tokenizer")
    assert training.ignore_data_skip  # the loader resumes by position, never by re-reading


def test_unet_folder_means_pretrained_and_both_is_ambiguous(tmp_path, file_list):
    init = tmp_path / "init"
    shutil.copytree(TINY_INIT, init)
    (init / "unet").mkdir()
    with pytest.raises(ValueError, match="both unet/ and unet_config.json"):
        parse(*base(file_list, tmp_path / "o")[:-1], str(init))
    model, _, _ = parse(*base(file_list, tmp_path / "o"), "--unet_name_or_path", str(init / "unet"))
    assert not model.unet_from_config


@pytest.mark.parametrize("flag,value,match", [
    ("--unet_name_or_path", "sd/configs/unet_tinyy.json", "no such config file"),
    ("--unet_name_or_path", "runs/nowhere/unet", "no such folder"),
    ("--vae_name_or_path", "nowhere/vae", "no such folder"),
    ("--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4", "no such folder"),
])
def test_mistyped_paths_are_errors_never_random_init(tmp_path, file_list, flag, value, match):
    with pytest.raises(FileNotFoundError, match=match):
        parse(*base(file_list, tmp_path / "o"), flag, value)


@pytest.mark.parametrize("extra,match", [
    (["--prediction_type", "sample"], "prediction_type"),
    (["--resolution", "100"], "multiple of 8"),
    (["--caption_dropout_prob", "1.5"], "caption_dropout_prob"),
    (["--snr_gamma", "0"], "snr_gamma"),
    (["--image_logging_steps", "7", "--logging_steps", "2"], "multiple of"),
    (["--fp16", "True", "--bf16", "True"], "exclusive"),
])
def test_bad_values_name_the_flag(tmp_path, file_list, extra, match):
    with pytest.raises(ValueError, match=match):
        parse(*base(file_list, tmp_path / "o", *extra))


def test_missing_file_list_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--file_list"):
        parse(*base(str(tmp_path / "missing.filelist.list"), tmp_path / "o"))


def test_cpu_notices_for_gpu_only_features(tmp_path, file_list):
    model, _, training = parse(*base(file_list, tmp_path / "o", "--fp16", "True",
                                     "--enable_xformers_memory_efficient_attention", "True"))
    assert not training.fp16 and any("fp16 needs a CUDA device" in n for n in training.notices)
    notices = resolve_model_features(model)
    assert not model.enable_xformers_memory_efficient_attention and len(notices) == 1
    _, _, bf16 = parse(*base(file_list, tmp_path / "p", "--bf16", "True", "--fp16_opt_level", "O2"))
    assert bf16.bf16 and bf16.fp16_opt_level == "O1" and "bf16 O2" in bf16.notices[0]


def test_resume_rules(tmp_path, file_list):
    out = tmp_path / "o"
    _, _, training = parse(*base(file_list, out))
    assert resolve_checkpoint(training) is None  # fresh output dir
    (out / "checkpoint-4").mkdir(parents=True)  # interrupted save: no marker
    with pytest.raises(ValueError, match="already exists and is not empty"):
        resolve_checkpoint(training)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / ".complete").write_text("")
    assert resolve_checkpoint(training) == str(out / "checkpoint-2")
    _, _, explicit = parse(*base(file_list, out, "--resume_from_checkpoint", str(out / "nope")))
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        resolve_checkpoint(explicit)
    json.dumps(training.to_dict())  # arguments stay serialisable for training_args.bin / VisualDL
