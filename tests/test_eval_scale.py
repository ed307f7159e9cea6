"""Evaluation at scale: eval.py's generation over ranks (a real 2-rank launch on CPU/gloo against one process) and its
resume, `eval.py score` (FID, KID, CLIP score) and the in-training prompt-set evaluation, with tiny networks of the
real structures: a random UNet of sd/tiny_init's config, an FID Inception-v3 at 1/16 width, and a CLIPModel whose
text tower is sd/tiny_init's text encoder (random vision tower), saved as Hugging Face writes CLIP folders."""
import json
import logging
import os
import shutil
import signal
import subprocess

import numpy as np
import paddle
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import eval as eval_cli
from helpers import PY, ROOT, TINY_INIT
from sd.eval import fid
from sd.eval.clip_score import ClipScorer
from sd.eval.distributed import share
from sd.eval.in_training import PromptSetEvalCallback, pack, plan_eval, scores_of, unpack
from sd.eval.inception import FIDInceptionV3, inception_features, load_inception, save_weights

PROMPTS = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom right"]


def gen_flags(unet_dir, out, *extra):
    return ["--model_dir", TINY_INIT, "--unet_path", str(unet_dir), "--prompt", *PROMPTS, "--guidance_scales", "1",
            "7.5", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--height", "32", "--width", "32",
            "--batch_size", "2", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from ppdiffusers import UNet2DConditionModel

    with open(os.path.join(TINY_INIT, "unet_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    out = tmp_path_factory.mktemp("run") / "unet"
    paddle.seed(1)
    UNet2DConditionModel.from_config(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_nets(tmp_path_factory):
    """(inception weights file, CLIP model folder)."""
    from ppdiffusers.transformers import CLIPConfig, CLIPModel, CLIPTextModel

    root = tmp_path_factory.mktemp("nets")
    paddle.seed(2)
    weights = str(root / "inception16.safetensors")
    save_weights(FIDInceptionV3(16), weights)
    with open(os.path.join(TINY_INIT, "text_encoder", "config.json"), encoding="utf-8") as f:
        text_config = {k: v for k, v in json.load(f).items() if k not in ("architectures", "dtype")}
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, projection_dim=48)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision, projection_dim=48))
    clip.text_model.set_state_dict(CLIPTextModel.from_pretrained(os.path.join(TINY_INIT, "text_encoder"))
                                   .text_model.state_dict())
    folder = root / "clip"
    clip.save_pretrained(str(folder), to_diffusers=True)  # torch names and layout, metadata format "pt"
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["logit_scale"] = tensors["logit_scale"].reshape(())  # a 0-d tensor, as in Hugging Face's files
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(os.path.join(TINY_INIT, "tokenizer")):
        shutil.copy(os.path.join(TINY_INIT, "tokenizer", name), folder)
    return weights, str(folder)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.unit
def test_share_is_disjoint_complete_and_balanced():
    items = list(range(11))
    for world in (1, 2, 3, 4, 16):
        parts = [share(items, r, world) for r in range(world)]
        assert sorted(x for p in parts for x in p) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [share(items, r, world) for r in range(world)]


@pytest.mark.unit
def test_rank_sums_add_up_to_the_scores_of_all_images():
    rng = np.random.default_rng(0)
    feats, cos = rng.standard_normal((9, 4)), rng.uniform(-0.2, 0.6, 9)
    vectors = []
    for r in range(2):
        m = fid.Moments.empty(4)
        m.add(feats[r::2])
        c = cos[r::2]
        vectors.append(pack({"images": len(c), "clip_score_sum": np.maximum(100 * c, 0).sum(),
                             "clip_cosine_sum": c.sum(), "clip_pairs": len(c)}, m))
    head, moments = unpack(vectors[0] + vectors[1], 4)
    ref = dict(zip(("mu", "sigma"), fid.feature_statistics(feats + 1)))
    scores = scores_of(head, moments, ref)
    assert scores["images"] == 9 and scores["clip_cosine"] == pytest.approx(cos.mean())
    assert scores["clip_score"] == pytest.approx(np.maximum(100 * cos, 0).mean())
    mu, sigma = fid.feature_statistics(feats)
    assert scores["fid"] == pytest.approx(fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), rel=1e-9)


@pytest.mark.unit
def test_launch_layout_rules_and_paddlemix_prompt_tables(tmp_path, unet_dir, monkeypatch):
    """Under a launch: --device gpu:N and the one-process commands are refused at start. PaddleMIX's coco captions
    (a caption_en column) are prompt files; its tab-separated "coco30k.csv" is named, not cut at commas."""
    from sd.eval.evaluation import read_prompts

    table = tmp_path / "coco1k.csv"
    table.write_text('id,caption_en\n1,"A man, riding a horse."\n2,A cat.\n', encoding="utf-8")
    assert read_prompts(str(table), "caption_en")[0] == ["A man, riding a horse.", "A cat."]
    tabbed = tmp_path / "coco30k.csv"
    tabbed.write_text("caption_en\nA man, riding a horse.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 has more cells than the header's 1 .*--prompt_format tsv"):
        read_prompts(str(tabbed), "caption_en")
    assert read_prompts(str(tabbed), "caption_en", "tsv")[0] == ["A man, riding a horse."]
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    with pytest.raises(ValueError, match="--device gpu:0 under paddle.distributed.launch would put every rank"):
        eval_cli.start(*eval_cli.parse(gen_flags(unet_dir, tmp_path / "o", "--device", "gpu:0")))
    with pytest.raises(ValueError, match="eval.py score runs in one process"):
        eval_cli.start(*eval_cli.parse(["score", "--images", str(tmp_path), "--clip_model", str(tmp_path)]))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "2")
    with pytest.raises(ValueError, match="rank 2 of 2 ranks is not a rank"):
        eval_cli.start(*eval_cli.parse(gen_flags(unet_dir, tmp_path / "o")))


def launch(args, log_dir, out_file, timeout=150):
    """A real `python -m paddle.distributed.launch --nproc_per_node 2` job; whatever is left of it is stopped."""
    with open(out_file, "wb") as out:
        p = subprocess.Popen([PY, "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                              str(log_dir), *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        return p.wait(timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # the launcher stops its ranks on SIGTERM
            p.wait(20)


@pytest.mark.smoke
def test_two_ranks_draw_the_images_of_one_process_and_reruns_resume(tmp_path, unet_dir, caplog):
    two, one = tmp_path / "two", tmp_path / "one"
    code = launch(["eval.py", *gen_flags(unet_dir, two)], tmp_path / "log", tmp_path / "launch.out")
    assert code == 0, (tmp_path / "launch.out").read_text()[-4000:]
    single = eval_cli.main(gen_flags(unet_dir, one))
    with open(two / "index.json", encoding="utf-8") as f:
        merged = json.load(f)
    assert sorted(os.listdir(two)) == ["eval_config.json", "g1", "g7.5", "index.json"]  # rank files merged away
    # One index, in the single process's order, equal but for the rank; units (prompt x guidance) alternate ranks.
    assert [{k: v for k, v in e.items() if k != "rank"} for e in merged] == [
        {k: v for k, v in e.items() if k != "rank"} for e in single]
    assert [e["rank"] for e in merged] == [u % 2 for u in range(6) for _ in range(2)]
    assert {e["rank"] for e in single} == {0}
    for a, b in zip(merged, single):  # the same seeds: equal up to float rounding in another batch (<= 1/255)
        assert np.abs(pixels(two / a["file"]) - pixels(one / b["file"])).max() <= 1
        assert np.abs(pixels(two / a["grid"]) - pixels(one / b["grid"])).max() <= 1

    # A rerun keeps every complete image (and the rank that drew it), drawing nothing.
    stamp = {e["file"]: os.stat(two / e["file"]).st_mtime_ns for e in merged}
    caplog.set_level(logging.INFO, logger="sd.eval")
    caplog.clear()
    again = eval_cli.main(gen_flags(unet_dir, two))
    assert again == merged and "6 prompt x guidance units, 6 already written, drawing 0" in caplog.text
    assert {f: os.stat(two / f).st_mtime_ns for f in stamp} == stamp
    # An interrupted run: no index.json yet, one rank's partial index, an image lost, debris of an atomic write.
    os.remove(two / "index.json")
    partial = [e for e in merged if e["prompt_index"] == 1]  # units (1, 1) and (7.5, 1): drawn by ranks 1 and 0
    with open(two / "index.rank-1.json", "w", encoding="utf-8") as f:
        json.dump({"rank": 1, "world_size": 2, "run_id": "old", "complete": False, "entries": partial}, f)
    os.remove(two / partial[-1]["file"])  # (7.5, 1) image 1: that unit is drawn again
    (two / "g1" / "00001_00.png.tmp.999").write_bytes(b"half a png")
    caplog.clear()
    resumed = eval_cli.main(gen_flags(unet_dir, two))
    assert "6 prompt x guidance units, 1 already written, drawing 5" in caplog.text
    assert os.stat(two / partial[0]["file"]).st_mtime_ns == stamp[partial[0]["file"]]  # kept, with its rank
    assert [e["rank"] for e in resumed] == [0, 0, 1, 1] + [0] * 8
    assert not [n for n in os.listdir(two) if n.startswith("index.rank-")]
    # Other settings into the same folder would mix two runs' images: refused before anything loads.
    with pytest.raises(FileExistsError, match=r"holds images of a run with other settings \(sampling.seed: 42 -> 7"):
        eval_cli.start(*eval_cli.parse(gen_flags(unet_dir, two, "--seed", "7")))


def random_images(folder, n, seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, 3)
        img = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"{i:05d}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.mark.unit
def test_score_command_fid_kid_and_clip_score(tmp_path, tiny_nets):
    weights, clip_dir = tiny_nets
    ref_paths = random_images(tmp_path / "ref", 10, seed=0)
    gen = tmp_path / "gen"
    entries = []
    for g, seed in ((1.0, 1), (7.5, 2)):
        for i, path in enumerate(random_images(gen / f"g{g:g}", 5, seed)):
            entries.append({"guidance": g, "prompt": PROMPTS[i % 3], "file": os.path.relpath(path, gen)})
    (gen / "sneaky.png").write_bytes(b"not an image")  # not in index.json: not read
    with open(gen / "index.json", "w", encoding="utf-8") as f:
        json.dump(entries, f)
    stats = str(tmp_path / "ref_stats.npz")
    eval_cli.main(["score", "--reference", str(tmp_path / "ref"), "--inception_weights", weights,
                   "--save_stats", stats])
    assert fid.load_stats(stats, 128)["features"].shape == (10, 128)
    common = ["--images", str(gen), "--inception_weights", weights, "--kid_subsets", "4"]
    by_npz = eval_cli.main(["score", *common, "--reference", stats, "--clip_model", clip_dir])
    by_folder = eval_cli.main(["score", *common, "--reference", str(tmp_path / "ref"),
                               "--output", str(tmp_path / "s.json")])
    with open(gen / "scores.json", encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(by_npz))
    assert [r["name"] for r in by_npz["groups"]] == ["g1", "g7.5"]
    # Against a direct computation with the same networks.
    net, scorer = load_inception(weights), ClipScorer(clip_dir)
    ref_feats = inception_features(net, [np.asarray(Image.open(p).convert("RGB")) for p in ref_paths], "bilinear")
    for row, g in zip(by_npz["groups"], (1.0, 7.5)):
        mine = [e for e in entries if e["guidance"] == g]
        images = [np.asarray(Image.open(gen / e["file"]).convert("RGB")) for e in mine]
        feats = inception_features(net, images, "bilinear")
        want = fid.frechet_distance(*fid.feature_statistics(feats), *fid.feature_statistics(ref_feats))
        assert row["fid"] == pytest.approx(want, rel=1e-6) and row["num_images"] == 5
        assert row["kid_mean"] == pytest.approx(fid.kernel_inception_distance(feats, ref_feats, 4, 1000)[0])
        cos = scorer.cosines(images, [e["prompt"] for e in mine])
        assert row["clip_cosine"] == pytest.approx(cos.mean()) and -1 <= row["clip_cosine"] <= 1
        assert row["clip_score"] == pytest.approx(np.maximum(100 * cos, 0).mean())
    assert not [n for n in os.listdir(clip_dir) if not n.endswith((".json", ".txt", ".safetensors"))]  # untouched
    for a, b in zip(by_npz["groups"], by_folder["groups"]):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-6) and "clip_score" not in b
    # A folder against itself: FID 0 (up to the root's rounding).
    self_score = eval_cli.main(["score", "--images", str(tmp_path / "ref"), "--reference", stats,
                                "--inception_weights", weights, "--kid_subsets", "2"])
    assert abs(self_score["groups"][0]["fid"]) < 1e-3

    # Start errors: one line naming the flag, nothing loaded.
    cases = [(["--images", str(gen), "--reference", stats, "--inception_weights", str(tmp_path / "no.safetensors")],
              "--inception_weights: no such file: .*no.safetensors"),
             (["--images", str(gen), "--clip_model", str(tmp_path / "nope")], "--clip_model: no such folder"),
             (["--images", str(gen), "--reference", stats], "--reference .*needs --inception_weights"),
             (["--images", str(tmp_path / "ref"), "--clip_model", clip_dir], "has no index.json, so no prompts"),
             (["--reference", str(tmp_path / "ref"), "--inception_weights", weights], "pass --images")]
    pickled = tmp_path / "pickled_clip"
    shutil.copytree(clip_dir, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02")
    cases.append((["--images", str(gen), "--clip_model", str(pickled)], "holds pickled weights .*pytorch_model.bin"))
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            eval_cli.cli("eval.py", lambda a: eval_cli.start(*eval_cli.parse(a)), ["score", *argv])
        line = str(e.value)
        assert "\n" not in line and line.startswith("eval.py: error: "), line
        assert __import__("re").search(msg, line), line


@pytest.mark.smoke
def test_training_evaluates_every_rank_slice_and_logs(tmp_path, tiny_nets):
    """The in-training evaluation on the tiny model (one process): scores equal a direct computation on the same
    images; demo captions add adherence; the flags are checked at parse and start."""
    from paddlenlp.trainer.trainer_callback import TrainerState
    from paddlenlp.transformers import CLIPTokenizer

    from sd.args import ModelArguments, parse_train
    from sd.components import resolve_components
    from sd.model import LatentDiffusionModel

    weights, clip_dir = tiny_nets
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,caption_en\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)), encoding="utf-8")
    random_images(tmp_path / "ref", 6, seed=3)
    stats = str(tmp_path / "ref.npz")
    net = load_inception(weights)
    fid.save_stats(stats, inception_features(net, [np.asarray(Image.open(p)) for p in
                                                   sorted(map(str, (tmp_path / "ref").iterdir()))], "bilinear"))
    (tmp_path / "empty.list").write_text("")
    base = ["--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--file_list", str(tmp_path / "empty.list"),
            "--pretrained_model_name_or_path", TINY_INIT]
    flags = base + ["--eval_steps", "2", "--eval_prompts", str(prompts), "--eval_prompt_column", "caption_en",
                    "--clip_model", clip_dir, "--inception_weights", weights, "--eval_reference_stats", stats,
                    "--eval_num_inference_steps", "2", "--per_device_eval_batch_size", "2"]
    training = parse_train(flags, environ={}).training
    plan = plan_eval(training)
    assert plan.prompts == tuple(PROMPTS) and plan.metrics == ("clip", "fid", "adherence")
    for extra, msg in ((["--eval_prompts", str(prompts)], "--eval_prompts needs --eval_steps"),
                       (["--eval_steps", "5"], "--eval_steps 5 needs --eval_prompts"),
                       (["--eval_steps", "5", "--eval_prompts", str(prompts), "--inception_weights", weights],
                        "--inception_weights and --eval_reference_stats go together")):
        with pytest.raises(ValueError, match=msg):
            parse_train(base + extra, environ={})
    other = tmp_path / "other.txt"
    other.write_text("a photo of a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match="nothing to score"):
        plan_eval(parse_train(base + ["--eval_steps", "2", "--eval_prompts", str(other)], environ={}).training)

    model = LatentDiffusionModel.from_components(ModelArguments(), resolve_components("train", TINY_INIT))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TINY_INIT, "tokenizer"))
    callback = PromptSetEvalCallback(plan, tokenizer, 32, training)
    state = TrainerState(global_step=2)
    model.train()
    paddle.seed(11)
    before = paddle.rand([4]).numpy()  # the training RNG stream continues as if nothing was drawn
    paddle.seed(11)
    scores = callback.evaluate(state, model)
    assert np.array_equal(paddle.rand([4]).numpy(), before) and model.unet.training
    images = callback.draw(model)
    assert len(images) == 3 and images[0].shape == (32, 32, 3)
    cos = ClipScorer(clip_dir).cosines(images, PROMPTS)
    assert scores["clip_score"] == pytest.approx(np.maximum(100 * cos, 0).mean())
    feats = inception_features(net, images, "bilinear")
    ref = fid.load_stats(stats)
    assert scores["fid"] == pytest.approx(fid.frechet_distance(*fid.feature_statistics(feats), ref["mu"],
                                                               ref["sigma"]), rel=1e-6)
    assert {"adherence_color", "adherence_all"} <= set(scores) and 0 <= scores["adherence_all"] <= 1
    assert state.log_history[-1]["step"] == 2 and state.log_history[-1]["eval_fid"] == scores["fid"]
