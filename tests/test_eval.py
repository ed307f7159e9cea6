"""eval.py and sd/eval/ (args, evaluation, adherence): real pipelines on sd/tiny_init with a random UNet, 32x32, 2 steps.

A random UNet draws noise, not shapes, so these tests check the machinery (files, seeds, errors, scoring); whether a
trained model clears a floor above chance is the lead's e2e test (it calls sd.eval.adherence.measure_adherence).
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import paddle
import pytest
from PIL import Image
from ppdiffusers import UNet2DConditionModel

import eval as eval_cli
from helpers import ROOT, TINY_INIT as INIT
from sd.eval import sampling
from sd.eval.adherence import (chance_levels, combination_order, measure_adherence, read_back, score_readings,
                               select_combinations)
from sd.device import DeviceFacts
from sd.eval.args import (AdherenceArguments, AdherenceSamplingArguments, ModelSourceArguments, PromptArguments,
                          SamplingArguments, resolve_device)
from sd.eval.evaluation import load_pipeline, sample_images
from sd.tiny.make_demo_data import COLORS, POSITIONS, SHAPES, render

PROMPTS = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom right"]
FAST = ["--num_inference_steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake training run: RUN/unet and RUN/unet_ema, two different random UNets of the tiny init's config."""
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(INIT, sub)), f"sd/tiny_init is incomplete: no {sub}/"
    with open(os.path.join(INIT, "unet_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    run = tmp_path_factory.mktemp("run")
    for seed, sub in ((1, "unet"), (2, "unet_ema")):
        paddle.seed(seed)
        UNet2DConditionModel.from_config(config).save_pretrained(str(run / sub))
    return run


@pytest.fixture(scope="module")
def pipe(run_dir):
    return load_pipeline(ModelSourceArguments(INIT, unet_path=str(run_dir / "unet")).resolve(), "ddim")


def _with_scheduler(pipe, name):
    """The same loaded components with another sampler (cheaper than a reload; load_pipeline is tested above)."""
    return sampling.make_pipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet,
                                  sampling.make_scheduler(name, pipe.scheduler.config))


def _generate(run_dir, out, *extra):
    return eval_cli.main(["--model_dir", INIT, "--unet_path", str(run_dir / "unet"), "--output_dir", str(out),
                          *FAST, *extra])


def _pixels(folder, entries):
    return np.stack([np.asarray(Image.open(os.path.join(folder, e["file"])), dtype=np.int16) for e in entries])


@pytest.mark.smoke
def test_generate_writes_pngs_grids_and_index(run_dir, tmp_path):
    entries = _generate(run_dir, tmp_path, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance_scales",
                        "1", "7.5", "--num_images_per_prompt", "2", "--negative_prompt", "blurry", "--seed", "5")
    with open(tmp_path / "index.json", encoding="utf-8") as f:
        index = json.load(f)
    assert index == entries and len(index) == 2 * 2 * 2
    for e in index:
        assert {"prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "file", "grid"} <= set(e)
        assert (e["negative_prompt"], e["scheduler"], e["steps"], e["base_seed"]) == ("blurry", "ddim", 2, 5)
        assert Image.open(tmp_path / e["file"]).size == (32, 32)
        assert e["prompt"] == PROMPTS[e["prompt_index"]]
        assert e["file"].startswith(f"g{e['guidance']:g}/") and e["grid"].startswith(f"g{e['guidance']:g}/")
    assert Counter(e["guidance"] for e in index) == {1.0: 4, 7.5: 4}
    # One grid per prompt and guidance, holding its 2 images side by side (2 px padding).
    grids = {(e["prompt_index"], e["guidance"]): e["grid"] for e in index}
    assert len(set(grids.values())) == 4
    assert all(Image.open(tmp_path / g).size == (2 + 2 * 34, 2 + 34) for g in grids.values())
    # Per-image seeds: distinct within a guidance, the same at every guidance (a paired sweep).
    by_g = {g: [e["seed"] for e in index if e["guidance"] == g] for g in (1.0, 7.5)}
    assert len(set(by_g[1.0])) == 4 and by_g[1.0] == by_g[7.5]
    # Guidance changes the images made from the same seeds.
    g1, g75 = (_pixels(tmp_path, [e for e in index if e["guidance"] == g]) for g in (1.0, 7.5))
    assert np.abs(g1 - g75).max() > 10
    # The resolved config is saved beside the images: the native size filled in, the components resolved.
    with open(tmp_path / "eval_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["command"] == "generate" and saved["prompts"]["prompt"] == PROMPTS[:2]
    assert (saved["sampling"]["height"], saved["sampling"]["width"]) == (32, 32)
    assert saved["components"]["scheduler"] == os.path.join(INIT, "scheduler")


@pytest.mark.smoke
def test_native_size_and_a_json_config(run_dir, tmp_path):
    """No --height/--width: the model's native size (sample_size x VAE factor); the flags as one .json file."""
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"model_dir": INIT, "unet_path": str(run_dir / "unet"), "prompt": [PROMPTS[0]],
                                  "num_inference_steps": 2, "output_dir": str(tmp_path / "out")}), encoding="utf-8")
    entries = eval_cli.main([str(config)])
    assert (entries[0]["height"], entries[0]["width"]) == (32, 32) and entries[0]["steps"] == 2


@pytest.mark.smoke
def test_same_seed_same_bytes_other_seed_differs(run_dir, tmp_path):
    args = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num_images_per_prompt", "2")
    a = _generate(run_dir, tmp_path / "a", *args, "--seed", "3")
    b = _generate(run_dir, tmp_path / "b", *args, "--seed", "3")
    c = _generate(run_dir, tmp_path / "c", *args, "--seed", "4")
    for ea, eb in zip(a, b):
        assert (tmp_path / "a" / ea["file"]).read_bytes() == (tmp_path / "b" / eb["file"]).read_bytes()
        assert (tmp_path / "a" / ea["grid"]).read_bytes() == (tmp_path / "b" / eb["grid"]).read_bytes()
    assert np.abs(_pixels(tmp_path / "a", a) - _pixels(tmp_path / "c", c)).mean() > 10


@pytest.mark.smoke
@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])  # deterministic / noise at every step
def test_images_do_not_depend_on_batch_size(pipe, scheduler):
    p = _with_scheduler(pipe, scheduler)
    out = {}
    for bs in (1, 2, 3):
        cfg = SamplingArguments(scheduler=scheduler, num_inference_steps=2, batch_size=bs)
        images = sample_images(p, PROMPTS, [0, 1, 2], cfg, 3.0, 32, 32, num_images_per_prompt=2)
        out[bs] = np.stack([np.asarray(im, dtype=np.int16) for per_prompt in images for im in per_prompt])
    # Equal up to float rounding: a matmul over a different batch may round the last bit, i.e. at most 1/255.
    for bs in (2, 3):
        assert np.abs(out[1] - out[bs]).max() <= 1 and np.abs(out[1] - out[bs]).mean() < 0.01
    # The prompt's index (not its batch) sets its seed: the same prompt at another index gives other images.
    cfg = SamplingArguments(scheduler=scheduler, num_inference_steps=2)
    moved = sample_images(p, [PROMPTS[0]], [7], cfg, 3.0, 32, 32, num_images_per_prompt=2)[0]
    assert np.abs(np.asarray(moved[0], dtype=np.int16) - out[1][0]).mean() > 10


@pytest.mark.unit
def test_start_errors_name_the_flag_before_any_weights_load(run_dir, tmp_path):
    base = ["--model_dir", INIT, "--unet_path", str(run_dir / "unet"), "--prompt", "x"]
    a_file = tmp_path / "taken"
    a_file.write_text("x", encoding="utf-8")
    cases = [
        (["--output_dir", str(a_file)], NotADirectoryError, "--output_dir .*taken is a file, not a folder"),
        (["--num_inference_steps", "5000"], ValueError, "--num_inference_steps 5000 is more than the 1000 timesteps"),
        (["--guidance_scales", "nan"], ValueError, "--guidance_scales: nan"),
        (["--guidance_scales", "inf"], ValueError, "--guidance_scales: inf"),
        (["--height", "-8"], ValueError, "--height must be positive, got -8"),
        (["--num_images_per_prompt", "0"], ValueError, "--num_images_per_prompt must be >= 1"),
        (["--device", "tpu"], ValueError, "--device must be cpu, gpu or gpu:N"),
        (["--variant", "ema"], FileNotFoundError, r"--variant ema: the UNet folder .*unet holds no \*\.ema\.\*"),
        (["--variant", "../x"], ValueError, "--variant must be a name"),
        (["--variant", "ema", "--use_ema"], ValueError, "pass one of them"),
        (["--layout", "ppdiffusers", "--num_images_per_prompt", "2"], ValueError, "--num_images_per_prompt must be 1"),
        (["--prompt_format", "tsv"], ValueError, "--prompt_format goes with --prompt_file"),
    ]
    for extra, error, msg in cases:
        with pytest.raises(error, match=msg):
            eval_cli.main(base + ["--output_dir", str(tmp_path / "out")] + extra)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.unit
def test_device_resolution_is_announced():
    no_cuda, one_gpu = DeviceFacts(cuda=False, bf16_supported=False), DeviceFacts(cuda=True, bf16_supported=True)
    assert resolve_device(None, no_cuda, 0) == ("cpu", []) and resolve_device(None, one_gpu, 1) == ("gpu", [])
    device, notices = resolve_device("gpu", no_cuda, 0)
    assert device == "cpu" and len(notices) == 1 and "--device gpu: this machine has no CUDA device" in notices[0]
    assert resolve_device("gpu:0", one_gpu, 1) == ("gpu:0", []) and resolve_device("cpu", one_gpu, 1) == ("cpu", [])
    with pytest.raises(ValueError, match=r"--device gpu:1: only 1 GPU\(s\) visible"):
        resolve_device("gpu:1", one_gpu, 1)


@pytest.mark.smoke
def test_cli_start_errors_are_one_line_without_traceback(run_dir, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    cases = [
        (["--prompt_file", str(bad), "--output_dir", str(tmp_path / "o")], "prompts.txt: not UTF-8 at byte offset 3"),
        (["--prompt_file", str(tmp_path), "--output_dir", str(tmp_path / "o")], "is a folder, not a file"),
        (["--prompt", "x", "--output_dir", str(bad)], "--output_dir .*prompts.txt is a file, not a folder"),
    ]
    for extra, msg in cases:
        proc = subprocess.run([sys.executable, "eval.py", "--model_dir", INIT, "--unet_path", str(run_dir / "unet"),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("eval.py: error: ") and re.search(msg, last), proc.stderr[-2000:]


@pytest.mark.smoke
def test_prompt_file_csv_through_cli(run_dir, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f'caption_en,x\n"{PROMPTS[0]}",1\n"{PROMPTS[2]}",2\n', encoding="utf-8")
    entries = _generate(run_dir, tmp_path / "out", "--prompt_file", str(prompts), "--prompt_column", "caption_en",
                        "--batch_size", "1")
    assert [e["prompt"] for e in entries] == [PROMPTS[0], PROMPTS[2]]
    with pytest.raises(ValueError, match="exactly one"):
        _generate(run_dir, tmp_path / "out", "--prompt_file", str(prompts), "--prompt", "x")


@pytest.mark.unit
def test_bad_height_or_width_is_a_clear_error(run_dir, tmp_path):
    # sd/tiny_init's VAE downsamples by 4; the pipeline needs multiples of 8.
    with pytest.raises(ValueError, match=r"--height 36 is not a multiple of 8 .*native size is 32"):
        eval_cli.main(["--model_dir", INIT, "--unet_path", str(run_dir / "unet"), "--prompt", "x",
                       "--height", "36", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--width 20 is not a multiple"):
        eval_cli.main(["--model_dir", INIT, "--unet_path", str(run_dir / "unet"), "--prompt", "x",
                       "--width", "20", "--output_dir", str(tmp_path)])
    assert not os.listdir(tmp_path)  # failed before writing anything


@pytest.mark.unit
def test_missing_unet_and_ema_and_text_encoder_errors(run_dir, tmp_path):
    """Through eval's flags (every rule of the resolver: tests/test_components.py)."""
    with pytest.raises(FileNotFoundError, match="has no unet/.*--unet_path"):
        ModelSourceArguments(INIT).resolve()  # an init folder: never a random UNet
    ckpt = tmp_path / "checkpoint-5"
    (ckpt / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"not a UNet folder.*did you mean .*checkpoint-5/unet"):
        ModelSourceArguments(INIT, unet_path=str(ckpt)).resolve()
    (ckpt / "unet" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="--use_ema: no unet_ema/ next to"):
        ModelSourceArguments(INIT, unet_path=str(ckpt / "unet"), use_ema=True).resolve()
    (ckpt / "text_encoder").mkdir()
    with pytest.raises(ValueError, match="trained text_encoder/: pass --text_encoder_path"):
        ModelSourceArguments(INIT, unet_path=str(ckpt / "unet")).resolve()
    src = ModelSourceArguments(INIT, unet_path=str(ckpt / "unet"), text_encoder_path=str(ckpt / "text_encoder"))
    assert src.resolve().text_encoder == str(ckpt / "text_encoder")
    ema = ModelSourceArguments(INIT, unet_path=str(run_dir / "unet"), use_ema=True).resolve()
    assert ema.unet == str(run_dir / "unet_ema")


@pytest.mark.smoke
def test_use_ema_samples_the_ema_weights(run_dir, tmp_path):
    plain = _generate(run_dir, tmp_path / "plain", "--prompt", PROMPTS[0])
    ema = _generate(run_dir, tmp_path / "ema", "--prompt", PROMPTS[0], "--use_ema")
    assert ema[0]["unet"] == str(run_dir / "unet_ema") and ema[0]["seed"] == plain[0]["seed"]
    assert np.abs(_pixels(tmp_path / "plain", plain) - _pixels(tmp_path / "ema", ema)).mean() > 10


@pytest.mark.unit
@pytest.mark.parametrize("cls,kwargs,msg", [
    (SamplingArguments, {"scheduler": "ddpm"}, "--scheduler"),
    (SamplingArguments, {"guidance_scales": [0.5]}, "not >= 1"),
    (SamplingArguments, {"guidance_scales": [3.0, 3.0]}, "duplicates"),
    (SamplingArguments, {"batch_size": 0}, "--batch_size"),
    (SamplingArguments, {"num_inference_steps": 0}, "--num_inference_steps"),
    (SamplingArguments, {"seed": -1}, "--seed"),
    (SamplingArguments, {"guidance_scales": []}, "at least one"),
    (SamplingArguments, {"height": 0}, "--height must be positive"),
    (AdherenceSamplingArguments, {"width": -8}, "--width must be positive"),
    (PromptArguments, {}, "exactly one"),
    (PromptArguments, {"prompt": ["a", " "]}, "--prompt #2 is empty"),
    (PromptArguments, {"prompt": ["a"], "prompt_column": "caption_en"}, "--prompt_column goes with"),
    (PromptArguments, {"prompt": ["a"], "num_images_per_prompt": 0}, "--num_images_per_prompt"),
    (AdherenceArguments, {"num_per_combination": 0}, "--num_per_combination"),
    (AdherenceArguments, {"max_combinations": 0}, r"--max_combinations must be in \[1, 90\]"),
    (AdherenceArguments, {"max_combinations": 91}, "--max_combinations"),
])
def test_arguments_check_their_values(cls, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        cls(**kwargs)


@pytest.mark.unit
def test_command_lines_and_adherence_defaults():
    """Both commands keep every flag (repeatable --prompt, bare --use_ema) and their own defaults."""
    command, (model, s, p) = eval_cli.parse(["--model_dir", "m", "--prompt", "a", "--prompt", "b", "c",
                                             "--use_ema", "--guidance_scales", "1", "3"])
    assert command == "generate" and model == ModelSourceArguments("m", use_ema=True)
    assert p.prompt == ["a", "b", "c"] and s.guidance_scales == [1.0, 3.0]
    assert (s.num_inference_steps, s.height, s.batch_size, s.output_dir) == (50, None, 8, "outputs/eval")
    command, (model, s, a) = eval_cli.parse(["adherence", "--model_dir", "m", "--use_ema", "False", "--seed", "0"])
    assert command == "adherence" and not model.use_ema and a == AdherenceArguments()
    assert s == AdherenceSamplingArguments(seed=0) and isinstance(s, SamplingArguments)
    assert (s.num_inference_steps, s.guidance_scales, s.height, s.width, s.batch_size, s.output_dir) == (
        20, [1.0, 7.5], 32, 32, 32, "outputs/adherence")
    with pytest.raises(ValueError, match="not used.*--num_per_combination"):  # adherence's own flags
        eval_cli.parse(["--model_dir", "m", "--prompt", "a", "--num_per_combination", "2"])


@pytest.mark.smoke
@pytest.mark.parametrize("scheduler", sorted(sampling.SCHEDULERS))
def test_each_scheduler_runs_two_steps(pipe, scheduler):
    p = _with_scheduler(pipe, scheduler)
    assert type(p.scheduler) is sampling.SCHEDULERS[scheduler][0]
    cfg = SamplingArguments(scheduler=scheduler, num_inference_steps=2)
    image = np.asarray(sample_images(p, [PROMPTS[0]], [0], cfg, 7.5, 32, 32)[0][0], dtype=np.float32)
    assert image.shape == (32, 32, 3) and image.std() > 1.0  # NaN latents decode to one flat color


@pytest.mark.unit
def test_combination_order_is_balanced():
    order = combination_order()
    assert len(order) == len(set(order)) == len(COLORS) * len(SHAPES) * len(POSITIONS)
    assert len({c for c, _, _ in order[:6]}) == 6 and len({s for _, s, _ in order[:3]}) == 3
    assert len({p for _, _, p in order[:5]}) == 5
    assert select_combinations(10) == order[:10] == combination_order()[:10]
    assert select_combinations(None) == order


@pytest.mark.unit
def test_scoring_with_real_demo_images():
    """read_back/score_readings on rendered demo images: all right except one deliberately wrong color."""
    combos = select_combinations(6)
    rng = np.random.default_rng(0)
    images = [[render(c, s, p, 32, rng), render(c, s, p, 32, rng)] for c, s, p in combos]
    wrong = "blue" if combos[0][0] != "blue" else "red"
    images[0][1] = render(wrong, combos[0][1], combos[0][2], 32, rng)
    score = score_readings(7.5, read_back(combos, images, 7.5, seed=0))
    assert score["num_images"] == 12
    assert score["accuracy"]["color"] == pytest.approx(11 / 12)
    assert score["accuracy"]["shape"] == score["accuracy"]["position"] == 1.0
    assert score["per_value"]["color"][combos[0][0]] == 0.5
    assert chance_levels() == pytest.approx({"color": 1 / 6, "shape": 1 / 3, "position": 1 / 5, "all": 1 / 90})


@pytest.mark.smoke
def test_adherence_mode_writes_json_and_table(run_dir, tmp_path):
    out = tmp_path / "adh"
    proc = subprocess.run(
        [sys.executable, "eval.py", "adherence", "--model_dir", INIT, "--unet_path", str(run_dir / "unet"),
         "--max_combinations", "3", "--num_per_combination", "2", "--num_inference_steps", "2",
         "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chance" in proc.stdout and "color" in proc.stdout
    with open(out / "adherence.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result["chance"] == pytest.approx({"color": 1 / 6, "shape": 1 / 3, "position": 1 / 5, "all": 1 / 90})
    assert [r["guidance"] for r in result["by_guidance"]] == [1.0, 7.5]
    for row in result["by_guidance"]:
        assert row["num_images"] == 6
        assert set(row["accuracy"]) == {"color", "shape", "position", "all"}
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values())
    assert len(result["records"]) == 12 and result["settings"]["height"] == 32
    assert (out / "adherence_g1.png").is_file() and (out / "adherence_g7.5.png").is_file()
    with open(out / "eval_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["command"] == "adherence" and saved["adherence"] == {"num_per_combination": 2, "max_combinations": 3}
    assert saved["components"]["unet"] == str(run_dir / "unet") and saved["sampling"]["num_inference_steps"] == 2


@pytest.mark.smoke
def test_measure_adherence_api_matches_its_records(pipe):
    sampling_args = AdherenceSamplingArguments(guidance_scales=[2.0], num_inference_steps=2, output_dir=None)
    result = measure_adherence(pipe, sampling_args, AdherenceArguments(num_per_combination=1, max_combinations=2))
    rows = result["records"]
    hits = sum(r["read"]["color"] == r["target"]["color"] for r in rows)
    assert result["by_guidance"][0]["accuracy"]["color"] == hits / len(rows) and len(rows) == 2
    assert result["settings"]["scheduler"] == "ddim" and result["settings"]["height"] == 32
    with pytest.raises(ValueError, match="samples with ddim but --scheduler is pndm"):
        measure_adherence(pipe, AdherenceSamplingArguments(scheduler="pndm", output_dir=None), AdherenceArguments())


@pytest.mark.smoke
def test_readme_snippets_and_a_pipeline_folder(run_dir, tmp_path):
    """The README's ppdiffusers snippets (a trained UNet swapped into a folder, then a whole pipeline folder), and
    eval.py on that pipeline folder without --unet_path: same images as the init folder + --unet_path."""
    from ppdiffusers import DDIMScheduler, StableDiffusionPipeline

    unet = UNet2DConditionModel.from_pretrained(str(run_dir / "unet"))
    pipe = StableDiffusionPipeline.from_pretrained(INIT, unet=unet, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=2,
                 generator=paddle.Generator().manual_seed(42)).images[0]
    assert image.size == (32, 32)
    pipe.save_pretrained(str(tmp_path / "full"))
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "full"), safety_checker=None)
    again.set_progress_bar_config(disable=True)
    assert again(PROMPTS[0], height=32, width=32, num_inference_steps=2).images[0].size == (32, 32)

    from_folder = eval_cli.main(["--model_dir", str(tmp_path / "full"), "--output_dir", str(tmp_path / "a"),
                                 "--prompt", PROMPTS[0], *FAST])
    from_init = _generate(run_dir, tmp_path / "b", "--prompt", PROMPTS[0])
    assert from_folder[0]["unet"] == os.path.join(str(tmp_path / "full"), "unet")
    assert np.array_equal(_pixels(tmp_path / "a", from_folder), _pixels(tmp_path / "b", from_init))
