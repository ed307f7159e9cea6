"""create_pretraining_data.py --input_format webdataset | parquet (img2dataset's outputs) and the filters: exact
counts against the synthetic input's known scores, the part's JSON second field (read by our loader), damaged
tars, members and rows that are not records, folder inputs, jsonl with scores. Dedup and shards:
tests/test_ingest_dedup.py."""
from __future__ import annotations

import io
import json
import os
import re
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.create_config import CreateDataArguments
from data_tools.create_outputs import CreateDataError
from data_tools.img2dataset import iter_tar
from data_tools.part_format import iter_part_lines, record_meta
from data_tools.synthetic_img2dataset import (expected_counts, image_bytes, synthetic_records, write_files,
                                              write_jsonl, write_webdataset)
from helpers import assert_every_record_once, cli, make, read_dataset, read_rejects
from trainer.loader.buckets import bucket_name, bucket_set, nearest_bucket
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset

pytestmark = pytest.mark.unit

FILTERS = dict(max_pwatermark=0.9, max_punsafe=0.45, min_aesthetic=4.0, min_similarity=0.2, max_aspect_ratio=2.5,
               min_image_size=32)
N = 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same N synthetic records as tars, as files + parquet and as jsonl + files (images written once)."""
    root = tmp_path_factory.mktemp("img2dataset")
    recs, images = synthetic_records(N), {}
    return recs, {"webdataset": write_webdataset(recs, str(root / "wds"), images=images),
                  "parquet": write_files(recs, str(root / "files"), images=images),
                  "jsonl": [write_jsonl(recs, str(root / "jsonl"), images=images)]}


def _part_lines(manifest: dict) -> list:
    return [raw for p in manifest["parts"] for _, raw in iter_part_lines(p["path"])]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "jsonl"])
def test_filtered_counts_are_exact(tmp_path, inputs, fmt):
    recs, paths = inputs
    out = str(tmp_path / "out")
    m = make(paths[fmt], out, input_format=fmt, per_part_file_num=16, aspect_ratio_buckets="64", bucket_step=16,
             **FILTERS)
    written, rejects = expected_counts(recs, fmt, **FILTERS)
    assert (m["records_written"], m["rejects_by_reason"]) == (written, rejects)
    assert written > 0 and len(rejects) >= 5  # the input exercises most filters
    assert_every_record_once(out, m, N if fmt == "parquet" else sum(r.success for r in recs))
    # what was written: captions in input order, JSON second field with the decoded size and the scores
    kept = [record_meta(raw) for raw in _part_lines(m)]
    assert all(set(k) >= {"w", "h", "similarity", "pwatermark", "punsafe", "aesthetic"} for k in kept)
    by_caption = {r.caption: r for r in recs}
    for (caption, data), meta in zip(read_dataset(out), kept):
        r = by_caption[caption]
        assert data == image_bytes(r) and (meta["w"], meta["h"]) == (r.width, r.height)
        assert meta["punsafe"] == r.scores["punsafe"] <= FILTERS["max_punsafe"]
        assert meta.get("original_width") == (None if fmt == "jsonl" else 2 * r.width)  # not in our jsonl
    # per bucket, as the loader would assign the written images (trainer/loader/buckets.py)
    buckets = bucket_set("64", 16)
    assert list(m["records_by_bucket"]) == [bucket_name(b) for b in buckets]
    assert m["records_by_bucket"] == {bucket_name(b): sum(nearest_bucket(k["w"], k["h"], buckets) == b for k in kept)
                                      for b in buckets}
    assert sum(m["records_by_bucket"].values()) == written
    assert sum(1 for n in m["records_by_bucket"].values() if n) > 1
    if fmt != "jsonl":  # img2dataset's key names the record in its rejects
        assert all(re.search(r"\b\d{9}\b", r["detail"]) for r in read_rejects(out))


def test_our_loader_reads_parts_with_the_json_field(tmp_path, inputs):
    recs, paths = inputs
    out = str(tmp_path / "out")
    m = make(paths["webdataset"], out, input_format="webdataset", min_image_size=32)
    assert all(b'\t{"w":' in raw for raw in _part_lines(m))
    fl = os.path.join(out, "filelist", "custom_dataset.filelist.list")
    ds = TextImageDataset(DataArguments(fl, resolution=16, caption_dropout_prob=0.0), None, 1, seed=1)
    it = ds.iter_samples(0)
    got = {next(it).caption for _ in range(m["records_written"])}
    assert got <= {r.caption for r in recs} and len(got) > m["records_written"] // 2


def _tar(path: str, members) -> str:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_damaged_tars_and_incomplete_samples(tmp_path, inputs):
    recs = [r for r in inputs[0][:6] if r.success]
    jpg = image_bytes(recs[0])
    good = write_webdataset(recs, str(tmp_path / "good"))[0]
    raw = open(good, "rb").read()
    cut = str(tmp_path / "cut.tar")  # cut inside the 4th sample's image: 3 samples, then the damage
    offset = raw.index(b"000000003.jpg") + 512 + 100
    open(cut, "wb").write(raw[:offset])
    odd = _tar(str(tmp_path / "odd.tar"), [
        ("a.jpg", jpg), ("a.txt", b"only an image and a caption"),
        ("b.txt", b"no image"), ("b.json", b"{}"),
        ("c.png", jpg),  # no caption anywhere
        ("d.jpg", jpg), ("d.json", json.dumps({"caption": "caption from the json", "punsafe": 0.1}).encode()),
        ("e.jpg", b"x" * 50_001), ("e.txt", b"too large"),
        ("f.jpg", jpg), ("f.txt", b"bad json"), ("f.json", b"{nope"),
        ("dir/g.JPG", jpg), ("dir/g.txt", b"key with a folder"),
        ("i.jpg", jpg), ("i.jpg", jpg), ("i.txt", b"a repeated member starts a new sample"),
        ("j.jpg", jpg), ("j.txt", b"caf\xe9 in latin-1")])
    not_a_tar = str(tmp_path / "zzz.tar")
    open(not_a_tar, "wb").write(b"this is not a tar file at all" * 40)
    out = str(tmp_path / "out")
    m = make([cut, odd, not_a_tar], out, input_format="webdataset", max_image_bytes=50_000,
             per_part_file_num=4)
    rejects = [(os.path.basename(r["source"]), r["line"], r["reason"]) for r in read_rejects(out)]
    assert rejects == [("cut.tar", 4, "corrupt_tar"),
                       ("odd.tar", 2, "missing_image_member"), ("odd.tar", 3, "missing_caption"),
                       ("odd.tar", 5, "image_too_large"), ("odd.tar", 6, "malformed_json"),
                       ("odd.tar", 8, "missing_caption"), ("odd.tar", 10, "caption_bad_unicode"),
                       ("zzz.tar", 1, "corrupt_tar")]
    assert [c for c, _ in read_dataset(out)] == [r.caption for r in recs[:3]] + [
        "only an image and a caption", "caption from the json", "key with a folder",
        "a repeated member starts a new sample"]
    assert_every_record_once(out, m, 3 + 1 + 10 + 1)
    metas = [record_meta(raw) for raw in _part_lines(m)]
    assert metas[3] is None and metas[4] == {"w": recs[0].width, "h": recs[0].height, "punsafe": 0.1}
    # a run that wants none of these records (another shard's) sees the same records: same boundaries, same damage
    for path in (cut, odd, not_a_tar):
        kept = list(iter_tar(path, lambda: True, 50_000, 1000))
        assert list(iter_tar(path, lambda: False, 50_000, 1000)) == [None] * len(kept) and None not in kept


def test_parquet_rows_embedded_images_and_jsonl_metadata(tmp_path, inputs):
    recs = inputs[0][:14]  # record 12 is a failed download
    jpg = image_bytes(recs[0])
    folder = str(tmp_path / "files")
    parquet = write_files(recs, folder)[0]
    os.remove(os.path.join(folder, "00000", recs[2].key + ".jpg"))  # listed, its image gone
    os.rename(os.path.join(folder, "00000", recs[3].key + ".jpg"), os.path.join(folder, "00000", recs[3].key + ".webp"))
    # img2dataset --output_format parquet: the image in the row's jpg column; a row without a key
    embedded = str(tmp_path / "embedded.parquet")
    pq.write_table(pa.table({"key": ["k1", None], "caption": ["embedded image", "no key"], "jpg": [jpg, jpg],
                             "similarity": [0.3, 0.3]}), embedded)
    # the same columns as jsonl lines; images under IMAGE_ROOT/<file stem>/
    meta_jsonl = os.path.join(folder, "00000.jsonl")
    with open(meta_jsonl, "w") as f:
        f.write(json.dumps({"key": recs[0].key, "caption": "metadata as jsonl", "status": "success"}) + "\n")
        f.write(json.dumps({"key": "../../../etc/passwd", "caption": "escape"}) + "\n")
    out = str(tmp_path / "out")
    m = make([parquet, embedded, meta_jsonl], out, input_format="parquet", image_root=folder)
    rejects = [(os.path.basename(r["source"]), r["line"], r["reason"]) for r in read_rejects(out)]
    assert rejects == [("00000.parquet", 3, "image_missing"), ("00000.parquet", 13, "download_failed"),
                       ("embedded.parquet", 2, "missing_key"), ("00000.jsonl", 2, "path_outside_root")]
    captions = [c for c, _ in read_dataset(out)]
    assert captions == [r.caption for i, r in enumerate(recs) if i not in (2, 12)] + [
        "embedded image", "metadata as jsonl"]
    assert_every_record_once(out, m, 14 + 2 + 2)
    assert record_meta(_part_lines(m)[-1]) is None  # no score or size column: NONE, as the reference writes


def test_folder_inputs_and_config_errors(tmp_path, inputs):
    recs, paths = inputs
    folder = os.path.dirname(paths["webdataset"][0])
    m = make([folder], str(tmp_path / "out"), input_format="webdataset")
    assert [os.path.basename(i["path"]) for i in m["inputs"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert m["settings"]["input_format"] == "webdataset"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CreateDataError, match="is a folder without .tar"):
        make([str(tmp_path / "empty")], str(tmp_path / "o2"), input_format="webdataset")
    bad = str(tmp_path / "nokey.parquet")
    pq.write_table(pa.table({"caption": ["x"]}), bad)
    with pytest.raises(CreateDataError, match="no 'key' column"):
        make([bad], str(tmp_path / "o3"), input_format="parquet")
    for flags, message in [(dict(input_format="tfrecord"), "--input_format must be one of"),
                           (dict(max_aspect_ratio=0.5), "--max_aspect_ratio must be >= 1"),
                           (dict(max_punsafe=1.5), "--max_punsafe must be in 0..1"),
                           (dict(min_similarity=float("nan")), "--min_similarity must be in -1..1"),
                           (dict(dedup_max_images=0), "--dedup_max_images must be >= 1"),
                           (dict(aspect_ratio_buckets="64x"), "--aspect_ratio_buckets '64x': bucket")]:
        with pytest.raises(ValueError, match=message):
            CreateDataArguments(output_path="o", input_path=["x"], **flags)


def test_jsonl_scores_travel_and_plain_jsonl_stays_none(tmp_path, inputs):
    recs, paths = inputs
    m = make(paths["jsonl"], str(tmp_path / "out"))
    metas = [record_meta(raw) for raw in _part_lines(m)]
    assert all(meta and {"w", "h", "pwatermark"} <= set(meta) for meta in metas)
    lines = open(paths["jsonl"][0]).read().splitlines()
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({k: v for k, v in json.loads(ln).items() if k in ("caption", "image")})
                               for ln in lines) + "\n")
    os.symlink(os.path.join(os.path.dirname(paths["jsonl"][0]), "img"), tmp_path / "img")
    m2 = make([str(plain)], str(tmp_path / "out2"))
    assert all(raw.split(b"\t")[1] == b"NONE" for raw in _part_lines(m2))


@pytest.mark.smoke  # starts a subprocess
def test_cli_webdataset_with_filters(tmp_path, inputs):
    recs, paths = inputs
    out = str(tmp_path / "out")
    r = cli("--input_path", os.path.dirname(paths["webdataset"][0]), "--output_path", out, "--input_format",
            "webdataset", "--max_punsafe", "0.45", "--dedup", "--num_workers", "1", "--aspect_ratio_buckets", "256")
    assert r.returncode == 0, r.stderr
    assert "punsafe_too_high" in r.stdout and "duplicate_image" in r.stdout and "by bucket     : 192x320" in r.stdout
    written, _ = expected_counts(recs, "webdataset", max_punsafe=0.45, dedup=True)
    assert len(read_dataset(out)) == written
