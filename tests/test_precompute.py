"""precompute_latents.py: the latent dataset it writes (data_tools/latent_format.py), its correctness against the
VAE and text encoder on the loader's own crops, resume/overwrite, and its distributed run (1 process vs 2 ranks of
paddle.distributed.launch on CPU give byte-identical shards)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import pytest

from data_tools import latent_format as lf
from data_tools.fileio import sha256_file
from helpers import PY, ROOT, TINY_INIT, make_parts

ENTRY = os.path.join(ROOT, "precompute_latents.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def precompute(file_list: str, out: str, *flags: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, ENTRY, "--file_list", file_list, "--pretrained_model_name_or_path", TINY_INIT,
                        "--resolution", "32", "--output_path", out, "--batch_size", "5", *flags],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=180)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def shard_digests(out: str, name: str = "latents") -> dict:
    folder = lf.shards_dir(out, name)
    return {n: sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def manifest_of(out: str, name: str = "latents") -> dict:
    return lf.read_latent_manifest(os.path.join(out, f"{name}.manifest.json"))


# ------------------------------------------------------------------------------------------------ unit
@pytest.mark.unit
def test_config_refuses_a_random_crop_and_bad_values_in_one_line(demo_file_list, tmp_path):
    from sd.precompute import PrecomputeArguments

    base = dict(file_list=demo_file_list, output_path=str(tmp_path))
    with pytest.raises(ValueError, match="--center_crop must be True, got False: a random crop .* cannot be cached"):
        PrecomputeArguments(**base, center_crop=False)
    for kw, msg in ((dict(latent_dtype="int8"), "--latent_dtype must be one of"),
                    (dict(resolution=30), "--resolution must be a positive multiple of 8"),
                    (dict(resume=True, overwrite=True), "--resume and --overwrite exclude each other")):
        with pytest.raises(ValueError, match=msg):
            PrecomputeArguments(**base, **kw)


@pytest.mark.unit
def test_shard_reader_reads_rows_lazily_in_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 2, 2)).astype(np.float32) * 10
    offsets, blob = lf.captions_to_tensors(["a", "", "ünï"])
    meta = {"format": lf.SHARD_FORMAT, "format_version": lf.FORMAT_VERSION, "records": 3}
    for dtype, rtol in (("float32", 0), ("float16", 2 ** -11), ("bfloat16", 2 ** -8)):
        path = str(tmp_path / f"{dtype}.safetensors")
        tensors = {k: (lf.to_storage(x * (1 + i), dtype), dtype) for i, k in enumerate(lf.MOMENT_KEYS)}
        tensors.update(input_ids=(np.arange(6, dtype=np.int32).reshape(3, 2), "int32"),
                       record_id=(np.array([[0, 1, 2], [0, 1, 5], [0, 2, 0]], np.int64), "int64"),
                       caption_offsets=(offsets, "int64"), caption_bytes=(blob, "uint8"))
        size, digest = lf.write_shard(path, tensors, meta)
        assert (size, digest) == (os.path.getsize(path), hashlib.sha256(open(path, "rb").read()).hexdigest())
        with lf.LatentShard(path) as shard:
            assert shard.num_records == 3 and shard.dtype("mean") == {"float32": "F32", "float16": "F16",
                                                                        "bfloat16": "BF16"}[dtype]
            rec = shard.record(2)
            np.testing.assert_allclose(rec.mean, x[2], rtol=rtol, atol=0)
            np.testing.assert_allclose(rec.std, 2 * x[2], rtol=rtol, atol=0)
            assert rec.mean.dtype == np.float32 and rec.mean_flip is None and rec.text is None
            assert (rec.caption, rec.record_id, rec.input_ids.tolist()) == ("ünï", (0, 2, 0), [4, 5])
            assert shard.caption(1) == ""
    # bfloat16 rounds to nearest even, as paddle's cast does
    import paddle
    y = rng.standard_normal(1000).astype(np.float32)
    assert np.array_equal(lf.to_storage(y, "bfloat16"), paddle.to_tensor(y).cast("bfloat16").numpy())


# ------------------------------------------------------------------------------------------------ smoke
@pytest.fixture(scope="module")
def float32_latents(demo_file_list, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents_f32"))
    precompute(demo_file_list, out, "--latent_dtype", "float32", "--random_flip", "True", "--dataloader_num_workers",
               "2")
    return out


@pytest.mark.smoke
def test_stored_moments_and_embeddings_equal_the_models_on_the_loaders_crops(float32_latents, demo_file_list):
    """For records drawn through the training loader (center crop; then center crop with random flip), the stored
    moments equal the VAE's posterior on the loader's very pixels (float32 storage; tolerance 2e-5 absolute, for
    batch 5 vs batch 1), the mirrored moments those of the mirrored crop, and the text embeddings the text
    encoder's output on the loader's tokenization of the caption."""
    import paddle
    from paddlenlp.transformers import CLIPTokenizer
    from ppdiffusers import AutoencoderKL
    from ppdiffusers.transformers import CLIPTextModel
    from trainer.loader.config import DataArguments
    from trainer.loader.text_image_dataset import TextImageDataset

    m = manifest_of(float32_latents)
    assert m["records"] == 96 and m["records_rejected"] == 0 and len(m["shards"]) == 4
    assert m["source"]["records_written"] == 96 and m["source"]["rejects_by_reason"] == {}
    assert lf.shards_of(m["filelist"]) == [s["path"] for s in m["shards"]]
    assert [s.filelist for s in lf.read_latent_file_list(m["file_list"])] == [m["filelist"]]
    vae = AutoencoderKL.from_pretrained(os.path.join(TINY_INIT, "vae"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(TINY_INIT, "text_encoder"))
    vae.eval(), text_encoder.eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_INIT, "tokenizer"))  # pads to its own 16, as precompute
    shards = {s["index"] - 1: lf.LatentShard(s["path"]) for s in m["shards"]}
    by_id = {sh.record(k).record_id: (sh, k) for sh in shards.values() for k in range(sh.num_records)}

    def posterior(pixels):
        with paddle.no_grad():
            d = vae.encode(paddle.to_tensor(pixels[None])).latent_dist
        return d.mean.numpy()[0], d.std.numpy()[0]

    plain = {}
    for flip in (False, True):
        ds = TextImageDataset(DataArguments(demo_file_list, resolution=32, center_crop=True, random_flip=flip,
                                            caption_dropout_prob=0.0, buffer_size=1), tok, 1, seed=7,
                              model_max_length=tok.model_max_length)
        flipped_seen = 0
        for _, sample in zip(range(12), ds.iter_samples(0)):
            s, _, part, line = sample.ref
            shard, k = by_id[(s, part, line)]
            rec = shard.record(k)
            mean, std = posterior(sample.pixel_values)
            is_flipped = flip and not np.array_equal(sample.pixel_values, plain[(part, line)])
            if not flip:
                plain[(part, line)] = sample.pixel_values.copy()
            if is_flipped:
                flipped_seen += 1
                np.testing.assert_array_equal(sample.pixel_values, plain[(part, line)][:, :, ::-1])
            want_mean, want_std = (rec.mean_flip, rec.std_flip) if is_flipped else (rec.mean, rec.std)
            np.testing.assert_allclose(want_mean, mean, rtol=0, atol=2e-5)
            np.testing.assert_allclose(want_std, std, rtol=0, atol=2e-5)
            assert rec.caption == sample.raw_caption
            ids = ds.tokenize([sample.raw_caption])
            np.testing.assert_array_equal(rec.input_ids, ids[0])
            with paddle.no_grad():
                text = text_encoder(paddle.to_tensor(ids))[0].astype("float32").numpy()[0]
            np.testing.assert_allclose(rec.text, text, rtol=0, atol=2e-5)
        assert flipped_seen > 0 if flip else True
    with paddle.no_grad():
        empty = text_encoder(paddle.to_tensor(ds.tokenize([""])))[0].astype("float32").numpy()[0]
    np.testing.assert_allclose(shards[0].empty_text(), empty, rtol=0, atol=2e-5)


@pytest.mark.smoke
def test_check_compatible_names_each_mismatch_in_one_line(float32_latents, tmp_path):
    import shutil

    m = manifest_of(float32_latents)
    dirs = {k: os.path.join(TINY_INIT, k) for k in ("vae", "text_encoder", "tokenizer")}
    sf = m["dependencies"]["scaling_factor"]
    ok = dict(resolution=32, scaling_factor=sf, model_max_length=16, random_flip=True, interpolation="lanczos")
    assert lf.check_compatible(m, dirs["vae"], dirs["text_encoder"], dirs["tokenizer"], **ok) == []
    other_vae = shutil.copytree(dirs["vae"], str(tmp_path / "vae"))
    cfg = json.load(open(os.path.join(other_vae, "config.json")))
    json.dump(dict(cfg, scaling_factor=0.5), open(os.path.join(other_vae, "config.json"), "w"))
    problems = lf.check_compatible(m, other_vae, dirs["text_encoder"], dirs["tokenizer"],
                                   **dict(ok, resolution=64, scaling_factor=0.5, model_max_length=20),
                                   center_crop=False, train_text_encoder=True)
    text = "\n".join(problems)
    for needle in ("the VAE config differs", "scaling_factor 0.5", "--resolution 64", "--center_crop False",
                   "--model_max_length 20", "--train_text_encoder"):
        assert needle in text, text
    assert all("\n" not in p for p in problems)


@pytest.mark.smoke
def test_resume_overwrite_and_compact_storage(demo_file_list, float32_latents, tmp_path):
    """bfloat16 storage and token ids only: a second run stops without --resume; --resume rewrites exactly the
    missing shard (same bytes) and keeps the others; --overwrite starts over; values match float32 within bf16."""
    out = str(tmp_path / "lat")
    flags = ("--latent_dtype", "bfloat16", "--text_embeddings", "False")
    precompute(demo_file_list, out, *flags)
    first = shard_digests(out)
    again = precompute(demo_file_list, out, *flags, ok=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "--resume" in again.stderr
    os.remove(os.path.join(lf.shards_dir(out, "latents"), "shard-000002.safetensors"))
    mtime = os.path.getmtime(os.path.join(lf.shards_dir(out, "latents"), "shard-000001.safetensors"))
    precompute(demo_file_list, out, *flags, "--resume")
    assert shard_digests(out) == first
    assert os.path.getmtime(os.path.join(lf.shards_dir(out, "latents"), "shard-000001.safetensors")) == mtime
    precompute(demo_file_list, out, *flags, "--overwrite")
    assert shard_digests(out) == first
    m, ref = manifest_of(out), manifest_of(float32_latents)
    assert m["dependencies"]["text_encoder"] is None and m["bytes_per_record"] < ref["bytes_per_record"]
    with lf.LatentShard(m["shards"][0]["path"]) as a, lf.LatentShard(ref["shards"][0]["path"]) as b:
        assert "text" not in a.keys and a.dtype("mean") == "BF16"
        for k in range(a.num_records):
            ra, rb = a.record(k), b.record(k)
            np.testing.assert_allclose(ra.mean, rb.mean, rtol=2 ** -8, atol=1e-30)
            np.testing.assert_array_equal(ra.input_ids, rb.input_ids)


@pytest.mark.smoke
def test_two_ranks_write_the_same_bytes_as_one_and_idle_ranks_do_not_hang(tmp_path):
    """3 uneven parts: 1 process and `paddle.distributed.launch --nproc_per_node 2` give identical shards (sha256)
    and manifest shard lists; a 1-part input on 2 ranks (rank 1 idle) finishes too."""
    three = make_parts(str(tmp_path / "three"), 60, per_part=24)
    one = make_parts(str(tmp_path / "one"), 10, per_part=24, name="one")
    precompute(three, str(tmp_path / "single"), "--random_flip", "True")
    for file_list, out in ((three, "dual"), (one, "idle")):
        p = subprocess.run([PY, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                            str(tmp_path / f"log_{out}"), ENTRY, "--file_list", file_list,
                            "--pretrained_model_name_or_path", TINY_INIT, "--resolution", "32", "--batch_size", "5",
                            "--output_path", str(tmp_path / out), "--random_flip", "True"],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
        logs = "".join(open(os.path.join(tmp_path / f"log_{out}", n)).read()[-2000:]
                       for n in sorted(os.listdir(tmp_path / f"log_{out}")))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + logs
        assert "precompute rank 0/2: shard" in logs
        assert ("precompute rank 1/2: no part to encode" if out == "idle" else "precompute rank 1/2: shard") in logs
    assert len(shard_digests(str(tmp_path / "single"))) == 3
    assert shard_digests(str(tmp_path / "dual")) == shard_digests(str(tmp_path / "single"))
    strip = [{k: v for k, v in s.items() if k != "path"} for s in manifest_of(str(tmp_path / "single"))["shards"]]
    assert [{k: v for k, v in s.items() if k != "path"} for s in manifest_of(str(tmp_path / "dual"))["shards"]] == strip
    assert manifest_of(str(tmp_path / "idle"))["records"] == 10
