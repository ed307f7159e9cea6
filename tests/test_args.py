"""Typed training arguments and their resolve step: explicit init choice, clear errors for bad paths and values,
device notices as a new resolved config (the parsed arguments never change), resume rules."""
import json
import os
import shutil

import pytest
from paddlenlp.trainer import PdArgumentParser

from helpers import TINY_INIT
from sd.args import ENV_ALIASES, DataArguments, ModelArguments, SDTrainingArguments, parse_train, resolve_train
from sd.device import DeviceFacts
from trainer.checkpoint import write_marker
from trainer.entry import resolve_checkpoint

CPU = DeviceFacts(cuda=False, bf16_supported=False)
OLD_GPU = DeviceFacts(cuda=True, bf16_supported=False)

pytestmark = pytest.mark.unit


def parse(*argv):
    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    return parser.parse_args_into_dataclasses(args=list(argv))


def resolve(*argv, device=CPU):
    return resolve_train(*parse(*argv), device=device)


@pytest.fixture()
def file_list(tmp_path):
    path = tmp_path / "x.filelist.list"
    path.write_text("x.filelist\n")
    return str(path)


def base(file_list, out, *extra):
    return ["--output_dir", str(out), "--file_list", file_list, "--max_steps", "5", "--logging_steps", "1",
            "--pretrained_model_name_or_path", TINY_INIT, *extra]


def test_init_folder_means_unet_from_its_config(tmp_path, file_list):
    run = resolve(*base(file_list, tmp_path / "o"))
    parts = run.components
    assert parts.unet_from_config and parts.unet.endswith("unet_config.json")
    assert parts.vae == os.path.join(TINY_INIT, "vae") and parts.tokenizer.endswith("tokenizer")
    assert run.training.ignore_data_skip  # the loader resumes by position, never by re-reading


def test_model_max_length_defaults_to_the_tokenizers_own(tmp_path, file_list):
    assert resolve(*base(file_list, tmp_path / "o")).model.model_max_length == 16  # the tiny tokenizer's
    assert resolve(*base(file_list, tmp_path / "o"), "--model_max_length", "77").model.model_max_length == 77


def test_unet_folder_means_pretrained_and_both_is_ambiguous(tmp_path, file_list):
    init = tmp_path / "init"
    shutil.copytree(TINY_INIT, init)
    (init / "unet").mkdir()
    with pytest.raises(ValueError, match="both unet/ and unet_config.json"):
        resolve(*base(file_list, tmp_path / "o")[:-1], str(init))
    with pytest.raises(FileNotFoundError, match="no such folder"):  # an empty unet/ is no UNet
        resolve(*base(file_list, tmp_path / "o"), "--unet_name_or_path", str(init / "unet" / "x"))
    run = resolve(*base(file_list, tmp_path / "o"), "--unet_name_or_path", str(init / "unet"))
    assert not run.components.unet_from_config


@pytest.mark.parametrize("flag,value,match", [
    ("--unet_name_or_path", "sd/configs/unet_tinyy.json", "no such config file"),
    ("--unet_name_or_path", "runs/nowhere/unet", "no such folder"),
    ("--vae_name_or_path", "nowhere/vae", "no such folder"),
    ("--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4", "no such folder"),
])
def test_mistyped_paths_are_errors_never_random_init(tmp_path, file_list, flag, value, match):
    with pytest.raises(FileNotFoundError, match=match):
        resolve(*base(file_list, tmp_path / "o"), flag, value)


@pytest.mark.parametrize("extra,match", [
    (["--resolution", "100"], "multiple of 8"),
    (["--caption_dropout_prob", "1.5"], "caption_dropout_prob"),
    (["--snr_gamma", "0"], "snr_gamma"),
    (["--snr_gamma", "5", "--snr_weighting", "capped_x0"], "capped_x0 needs --prediction_type v_prediction"),
    (["--image_logging_steps", "7", "--logging_steps", "2"], "multiple of"),
    (["--fp16", "True", "--bf16", "True"], "exclusive"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--seed", "-5"], "--seed"),
    (["--max_nonfinite_steps", "0"], "max_nonfinite_steps"),
    (["--model_max_length", "1000"], "exceeds the text encoder's max_position_embeddings 77"),
])
def test_bad_values_name_the_flag(tmp_path, file_list, extra, match):
    with pytest.raises(ValueError, match=match):  # at parse, or at resolve (against the model's own config)
        resolve(*base(file_list, tmp_path / "o", *extra))


def test_a_value_outside_the_choices_is_a_parse_error(tmp_path, file_list, capsys):
    with pytest.raises(SystemExit):
        parse(*base(file_list, tmp_path / "o", "--prediction_type", "sample"))
    assert "--prediction_type: invalid choice: 'sample'" in capsys.readouterr().err


def test_missing_file_list_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--file_list"):
        parse(*base(str(tmp_path / "missing.filelist.list"), tmp_path / "o"))


def test_cpu_notices_for_gpu_only_features(tmp_path, file_list):
    parsed = parse(*base(file_list, tmp_path / "o", "--fp16", "True", "--to_static", "True",
                         "--enable_xformers_memory_efficient_attention", "True"))
    run = resolve_train(*parsed, device=CPU)
    assert not run.training.fp16 and not run.features.memory_efficient_attention
    assert [n.split(" ")[0] for n in run.notices] == ["fp16", "memory-efficient"]
    # compiled UNet, never the Trainer's whole-wrapper to_static
    assert run.features.static_unet and not run.training.to_static
    model, _, training = parsed  # parse, resolve, never mutate: what the user asked stays as asked
    assert training.fp16 and training.to_static and model.enable_xformers_memory_efficient_attention
    bf16 = resolve(*base(file_list, tmp_path / "p", "--bf16", "True", "--fp16_opt_level", "O2"))
    assert bf16.training.bf16 and bf16.training.fp16_opt_level == "O1" and "bf16 O2" in bf16.notices[0]
    old = resolve(*base(file_list, tmp_path / "q", "--bf16", "True"), device=OLD_GPU)
    assert not old.training.bf16 and "compute capability" in old.notices[0]


def test_learning_rates_resolve_once(tmp_path, file_list):
    run = resolve(*base(file_list, tmp_path / "o", "--learning_rate", "1e-4", "--unet_learning_rate", "2e-4"))
    assert run.training.learning_rate == run.unet_learning_rate == 2e-4  # the scheduler's base is the UNet's
    assert run.text_encoder_learning_rate == 2e-4
    te = resolve(*base(file_list, tmp_path / "p", "--text_encoder_learning_rate", "1e-5"))
    assert te.unet_learning_rate == te.training.learning_rate and te.text_encoder_learning_rate == 1e-5


def test_resolved_config_is_saved_as_json(tmp_path, file_list):
    run = resolve(*base(file_list, tmp_path / "o", "--fp16", "True"))
    saved = json.loads(open(run.save(str(tmp_path))).read())
    assert saved["training"]["fp16"] is False and saved["components"]["unet"].endswith("unet_config.json")
    assert saved["notices"] == list(run.notices) and saved["data"]["file_list"] == file_list
    with pytest.raises(Exception):  # frozen: a resolved config is never changed after the fact
        run.unet_learning_rate = 1.0


def test_resume_rules(tmp_path, file_list):
    out = tmp_path / "o"
    _, _, training = parse(*base(file_list, out))
    assert resolve_checkpoint(training) is None  # fresh output dir
    (out / "checkpoint-4").mkdir(parents=True)  # interrupted save: no marker
    with pytest.raises(ValueError, match="already exists and is not empty"):
        resolve_checkpoint(training)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    write_marker(str(out / "checkpoint-2"), 2)  # the complete marker listing its files (trainer/checkpoint.py)
    assert resolve_checkpoint(training) == str(out / "checkpoint-2")
    _, _, explicit = parse(*base(file_list, out, "--resume_from_checkpoint", str(out / "nope")))
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        resolve_checkpoint(explicit)


ALL_ON = {variable: "1" for variable, _ in ENV_ALIASES}


def test_flag_environment_variables_are_read_once_and_an_explicit_flag_wins(tmp_path, file_list):
    argv = base(file_list, tmp_path / "o")
    args = parse_train(argv, environ=ALL_ON)
    model, training = args.model, args.training
    assert model.use_ema and model.enable_xformers_memory_efficient_attention and model.use_fused_linear
    assert training.recompute and training.benchmark and training.to_static
    run = resolve_train(*args[:3], device=CPU, env=args.env)
    assert run.features.recompute and run.features.static_unet
    assert "--use_ema True from the environment (FLAG_USE_EMA=1)" in run.aliases
    assert len(run.aliases) == len(ENV_ALIASES)
    # The explicit flag wins either way, bare or with a value, and the record says so.
    args = parse_train(argv + ["--use_ema", "False", "--recompute=false"], environ=ALL_ON)
    assert not args.model.use_ema and not args.training.recompute and args.training.benchmark
    assert "FLAG_USE_EMA=1 not taken: --use_ema on the command line wins" in [a.notice() for a in args.env]
    off = parse_train(argv + ["--benchmark"], environ={"FLAG_BENCHMARK": "0", "FLAG_USE_EMA": "no"})
    assert off.training.benchmark and not off.model.use_ema
    assert parse_train(argv, environ={}).env == () and not parse_train(argv, environ={"FLAG_USE_EMA": ""}).env


def test_flag_environment_variables_with_a_json_argument(tmp_path, file_list):
    flags = base(file_list, tmp_path / "o")
    config = {flags[i][2:]: flags[i + 1] for i in range(0, len(flags), 2)}
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**config, "recompute": False}))
    args = parse_train([str(path)], environ={"FLAG_USE_EMA": "true", "FLAG_RECOMPUTE": "1"})
    assert args.model.use_ema and not args.training.recompute  # the file names recompute: it wins


def test_a_bad_flag_environment_value_names_the_variable(tmp_path, file_list):
    with pytest.raises(ValueError, match="FLAG_RECOMPUTE must be 1 or 0 .*got 'maybe'"):
        parse_train(base(file_list, tmp_path / "o"), environ={"FLAG_RECOMPUTE": "maybe"})


def test_reference_spellings_report_to_and_image_logging_off(tmp_path, file_list):
    run = resolve(*base(file_list, tmp_path / "o", "--report_to", "custom_visualdl", "--image_logging_steps", "-1"))
    assert run.training.report_to == ["visualdl"] and run.training.image_logging_steps == -1
    assert any("custom_visualdl" in a and "visualdl" in a for a in run.aliases)
    assert resolve(*base(file_list, tmp_path / "p")).aliases == ()


def test_reference_command_needs_no_tokenizer_flag(tmp_path, file_list):
    """The reference's 4.2 component flags: vae and text encoder folders of one pipeline, a UNet config."""
    run = resolve(*base(file_list, tmp_path / "o")[:-2], "--vae_name_or_path", os.path.join(TINY_INIT, "vae"),
                  "--text_encoder_name_or_path", os.path.join(TINY_INIT, "text_encoder"),
                  "--unet_name_or_path", os.path.join(TINY_INIT, "unet_config.json"))
    assert run.components.tokenizer == os.path.join(TINY_INIT, "tokenizer")
