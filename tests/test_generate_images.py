"""generate_images.py, the reference's entry name: its flags (rebuilt here from its documented argparse CLI) parse
with its defaults, map onto eval.py's dataclasses, and write its layout (SAVE_PATH/mscoco.en_g<scale>/<row>_000.png,
what PaddleMIX's compute_fid_clip_score.py reads), with the same images eval.py draws from the same seeds.

The model is sd/tiny_init's components in a pipeline folder with a random UNet saved twice: plain and as
ppdiffusers' "ema" variant (what a finished run holds), 32x32, 2 steps.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image
from ppdiffusers import UNet2DConditionModel

import eval as eval_cli
import generate_images as gen
from helpers import ROOT, TINY_INIT as INIT
from sd.config import build_parser, parse_args
from sd.device import has_cuda
from sd.eval.args import ModelSourceArguments, PromptArguments, SamplingArguments

# The reference's generate_images.py command line: every flag and its default (its argparse, read by hand).
REFERENCE_DEFAULTS = {"--text_encoder_model_name_or_path": None, "--file": "coco30k", "--variant": "fp32",
                      "--seed": 42, "--scheduler_type": "ddim", "--device": "gpu", "--batch_size": 16,
                      "--num_inference_steps": 50, "--save_path": "outputs",
                      "--guidance_scales": ["1.5", "2", "3", "4", "5", "6", "7", "8"], "--height": 256, "--width": 256}
REFERENCE_REQUIRED = ["--unet_model_name_or_path"]
CAPTIONS = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom right"]
FAST = ["--num_inference_steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished run's output_dir: a pipeline folder whose unet/ holds plain and "ema" variant weights."""
    run = tmp_path_factory.mktemp("run")
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(os.path.join(INIT, sub), run / sub)
    shutil.copy(os.path.join(INIT, "model_index.json"), run / "model_index.json")
    with open(os.path.join(INIT, "unet_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for seed, variant in ((1, None), (2, "ema")):
        paddle.seed(seed)
        UNet2DConditionModel.from_config(config).save_pretrained(str(run / "unet"), variant=variant)
    assert (run / "unet" / "diffusion_paddle_model.ema.safetensors").is_file()
    return run


def _tsv(path, captions, extra_column=True):
    rows = ["id\tcaption_en"] + [f"{i}\t{c}" for i, c in enumerate(captions)] if extra_column else \
        ["caption_en"] + list(captions)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.unit
def test_every_reference_flag_parses_with_its_default():
    options = {s for a in build_parser([gen.GenerateImagesArguments])._actions for s in a.option_strings}
    assert set(REFERENCE_DEFAULTS) | set(REFERENCE_REQUIRED) <= options
    (args,) = parse_args([gen.GenerateImagesArguments], ["--unet_model_name_or_path", "u"])
    for flag, default in REFERENCE_DEFAULTS.items():
        assert getattr(args, flag[2:]) == default, flag
    with pytest.raises(SystemExit):  # required, as in the reference
        parse_args([gen.GenerateImagesArguments], [])
    # The reference's choices, "euler-ancest" included (its own code then fails; ours means euler-ancestral).
    for scheduler in ("ddim", "lms", "pndm", "euler-ancest"):
        parse_args([gen.GenerateImagesArguments], ["--unet_model_name_or_path", "u", "--scheduler_type", scheduler])
    for variant in ("fp32", "bf16"):
        parse_args([gen.GenerateImagesArguments], ["--unet_model_name_or_path", "u", "--variant", variant])


@pytest.mark.unit
def test_flags_map_onto_eval_dataclasses(run_folder, tmp_path):
    captions = _tsv(tmp_path / "coco1k.tsv", CAPTIONS)
    argv = ["--unet_model_name_or_path", str(run_folder / "unet"), "--text_encoder_model_name_or_path",
            str(run_folder / "text_encoder"), "--file", captions, "--variant", "ema", "--seed", "7",
            "--scheduler_type", "euler-ancest", "--device", "cpu", "--batch_size", "4", "--num_inference_steps", "3",
            "--save_path", str(tmp_path / "out"), "--guidance_scales", "2", "7.5", "--height", "64", "--width", "32"]
    (args,) = parse_args([gen.GenerateImagesArguments], argv)
    (model, sampling_args, prompts), notices = gen.translate(args)
    assert model == ModelSourceArguments(model_dir=str(run_folder), unet_path=str(run_folder / "unet"),
                                         text_encoder_path=str(run_folder / "text_encoder"), variant="ema")
    assert sampling_args == SamplingArguments(scheduler="euler-ancestral", num_inference_steps=3,
                                              guidance_scales=[2.0, 7.5], height=64, width=32, seed=7, batch_size=4,
                                              output_dir=str(tmp_path / "out"), device="cpu")
    assert prompts == PromptArguments(prompt_file=captions, prompt_column="caption_en", prompt_format="tsv",
                                      layout="ppdiffusers")
    assert len(notices) == 1 and "not given" in notices[0]  # the model folder: the unet's pipeline folder
    (plain,) = parse_args([gen.GenerateImagesArguments], argv[:8] + ["--variant", "fp32"])
    assert gen.translate(plain).args[0].variant is None  # fp32: the plain weights, as the reference maps it


@pytest.mark.unit
def test_refusals_and_announcements_name_the_reference_flag(run_folder, tmp_path):
    unet = str(run_folder / "unet")
    captions = _tsv(tmp_path / "c.tsv", CAPTIONS)
    taken = tmp_path / "taken"
    taken.write_text("x", encoding="utf-8")
    plain_unet = tmp_path / "ckpt" / "unet"  # a checkpoint's unet/: plain weights only, no pipeline folder around it
    shutil.copytree(run_folder / "unet", plain_unet, ignore=shutil.ignore_patterns("*.ema.*"))
    cases = [
        (["--file", str(tmp_path / "coco30k")], FileNotFoundError,
         r"--file .*coco30k: no such file; the reference downloads it from https://\S+/coco30k.tsv"),
        (["--file", str(tmp_path)], IsADirectoryError, "--file .* is a folder, not a file"),
        (["--file", captions, "--save_path", str(taken)], NotADirectoryError, "--save_path .*taken is a file"),
        (["--file", captions, "--guidance_scales", "abc"], ValueError, "--guidance_scales: 'abc' is not a number"),
        (["--file", captions, "--guidance_scales", "nan"], ValueError, "--guidance_scales: nan"),
        (["--file", captions, "--device", "xpu"], ValueError, "--device must be cpu, gpu or gpu:N"),
        (["--file", captions, "--num_inference_steps", "0"], ValueError, "--num_inference_steps must be >= 1"),
        (["--file", captions, "--height", "-256"], ValueError, "--height must be positive"),
        (["--file", captions, "--unet_model_name_or_path", str(tmp_path / "nope")], FileNotFoundError,
         "--unet_model_name_or_path: no such folder"),
        (["--file", captions, "--unet_model_name_or_path", str(plain_unet)], ValueError,
         "--model_name_or_path is needed: .*CompVis/stable-diffusion-v1-4"),
        (["--file", captions, "--unet_model_name_or_path", str(plain_unet), "--model_name_or_path",
          str(run_folder), "--variant", "ema"], FileNotFoundError,
         r"--variant ema: the UNet folder .*ckpt/unet holds no \*\.ema\.\* weight file \(variants there: none\)"),
    ]
    for extra, error, msg in cases:
        with pytest.raises(error, match=msg):
            gen.start(["--unet_model_name_or_path", unet, *extra])
    # Announced, not refused: an unseeded reference run gets a drawn seed; a scale typed "8.0" names its folder g8.
    config, prompts = gen.start(["--unet_model_name_or_path", unet, "--file", captions, "--seed", "0",
                                 "--guidance_scales", "8.0", "--save_path", str(tmp_path / "o"), *FAST])
    assert prompts == CAPTIONS and config.sampling.seed > 0
    assert any(f"drawn seed {config.sampling.seed}" in n for n in config.notices)
    assert any("folder mscoco.en_g8 (the reference names it as typed, mscoco.en_g8.0)" in n for n in config.notices)
    # The reference passes --variant to an explicit text encoder too; ours has no ema file: plain weights, announced.
    config, _ = gen.start(["--unet_model_name_or_path", unet, "--file", captions, "--variant", "ema",
                           "--text_encoder_model_name_or_path", str(run_folder / "text_encoder"),
                           "--save_path", str(tmp_path / "o"), *FAST])
    assert (config.unet_variant, config.text_encoder_variant) == ("ema", None)
    assert any("the text encoder" in n and "loading its plain weights" in n for n in config.notices)


@pytest.mark.smoke
def test_reference_layout_and_same_images_as_eval(run_folder, tmp_path):
    """--variant ema through generate_images.py: the reference's folders of numbered PNGs (nothing else in them),
    pixel for pixel what eval.py --variant ema draws from the same seeds, and not the plain UNet's images."""
    captions = _tsv(tmp_path / "coco1k.tsv", CAPTIONS)
    save = tmp_path / "outputs"
    entries = gen.main(["--unet_model_name_or_path", str(run_folder / "unet"), "--file", captions, "--variant", "ema",
                        "--guidance_scales", "1", "7.5", "--batch_size", "2", "--seed", "5", "--save_path", str(save),
                        "--device", "gpu", *FAST])
    assert sorted(os.listdir(save)) == ["eval_config.json", "index.json", "mscoco.en_g1", "mscoco.en_g7.5"]
    for folder in ("mscoco.en_g1", "mscoco.en_g7.5"):
        assert sorted(os.listdir(save / folder)) == ["00000_000.png", "00001_000.png", "00002_000.png"]
    assert [(e["prompt"], e["file"], e["variant"]) for e in entries[:3]] == [
        (c, f"mscoco.en_g1/{i:05d}_000.png", "ema") for i, c in enumerate(CAPTIONS)]
    with open(save / "eval_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["entry"]["file"] == captions and saved["unet_variant"] == "ema"
    assert saved["sampling"]["device"] == ("gpu" if has_cuda() else "cpu")
    if not has_cuda():
        assert any("--device gpu: this machine has no CUDA device" in n for n in saved["notices"])

    same = eval_cli.main(["--model_dir", str(run_folder), "--variant", "ema", "--prompt_file", captions,
                          "--prompt_column", "caption_en", "--guidance_scales", "1", "7.5", "--seed", "5",
                          "--batch_size", "2", "--output_dir", str(tmp_path / "eval"), *FAST])
    assert [e["seed"] for e in same] == [e["seed"] for e in entries]
    for a, b in zip(entries, same):
        assert np.array_equal(_pixels(save / a["file"]), _pixels(tmp_path / "eval" / b["file"]))
    plain = gen.main(["--unet_model_name_or_path", str(run_folder / "unet"), "--file", captions,
                      "--guidance_scales", "1", "--seed", "5", "--save_path", str(tmp_path / "plain"), *FAST])
    assert np.abs(_pixels(tmp_path / "plain" / plain[0]["file"]) - _pixels(save / entries[0]["file"])).mean() > 10

    # A shorter caption file into the same folders would leave rows 1-2 of the first run to be scored: refused.
    with pytest.raises(FileExistsError, match=r"2 image\(s\) not from this run, e.g. .*mscoco.en_g1/00001_000.png"):
        gen.start(["--unet_model_name_or_path", str(run_folder / "unet"), "--file", _tsv(tmp_path / "one.tsv",
                   CAPTIONS[:1]), "--guidance_scales", "1", "--save_path", str(save), *FAST])
    # A row with an empty caption would shift every later image against its caption: refused in this layout.
    # (An empty line is no row at all, for csv as for the reference's pandas: it shifts nothing.)
    holes = tmp_path / "holes.tsv"
    holes.write_text("id\tcaption_en\n1\ta cat\n\n2\t\n3\ta dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holes.tsv: rows skipped \({'blank': 1, 'over_long': 0}\)"):
        gen.start(["--unet_model_name_or_path", str(run_folder / "unet"), "--file", str(holes),
                   "--save_path", str(tmp_path / "h"), *FAST])


@pytest.mark.smoke
def test_entry_start_error_is_one_line(run_folder, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "generate_images.py"), "--unet_model_name_or_path",
                           str(run_folder / "unet"), "--save_path", str(tmp_path / "o")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("generate_images.py: error: --file coco30k: no such file; the reference downloads")
    assert not (tmp_path / "o").exists()
