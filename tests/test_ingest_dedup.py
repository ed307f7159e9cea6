"""--dedup: which copy is kept (the first that passes every check), sharded runs merged equal the unsharded run
(duplicates across shards), a resumed run decides as the uninterrupted one, and the index's limit."""
from __future__ import annotations

import json
import os

import pytest

from data_tools.create_data import merge_shards
from data_tools.create_outputs import CreateDataError
from data_tools.synthetic_img2dataset import expected_counts, synthetic_records, write_webdataset
from helpers import assert_every_record_once, create, image_bytes, make, part_files, read_dataset, read_rejects, \
    write_image, write_jsonl

pytestmark = pytest.mark.unit


def test_the_first_copy_that_passes_every_check_is_kept(tmp_path):
    a, b = image_bytes(40, 32, seed=1), image_bytes(40, 32, seed=2)
    write_image(str(tmp_path / "a.jpg"), a)
    write_image(str(tmp_path / "a_copy.jpg"), a)  # another file, the same bytes
    write_image(str(tmp_path / "b.jpg"), b)
    write_image(str(tmp_path / "tiny.png"), image_bytes(8, 8, fmt="PNG"))
    write_image(str(tmp_path / "tiny_copy.png"), image_bytes(8, 8, fmt="PNG"))
    lines = [{"caption": "a, unsafe", "image": "a.jpg", "punsafe": 0.9},  # filtered: not the kept copy
             {"caption": " ", "image": "a.jpg", "punsafe": 0.0},  # blank caption: not the kept copy either
             {"caption": "a, first that passes", "image": "a_copy.jpg", "punsafe": 0.0},
             {"caption": "b", "image": "b.jpg", "punsafe": 0.0},
             {"caption": "a again", "image": "a.jpg", "punsafe": 0.0},
             {"caption": "a again, unsafe", "image": "a.jpg", "punsafe": 0.8},  # the filter's reject, not dedup's
             {"caption": "tiny", "image": "tiny.png", "punsafe": 0.0},
             {"caption": "tiny again", "image": "tiny_copy.png", "punsafe": 0.0}]  # too small, as its first copy
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    out = str(tmp_path / "out")
    m = make([jsonl], out, dedup=True, max_punsafe=0.5, min_image_size=16, per_part_file_num=3)
    assert [c for c, _ in read_dataset(out)] == ["a, first that passes", "b"]
    assert [(r["line"], r["reason"]) for r in read_rejects(out)] == [
        (1, "punsafe_too_high"), (2, "blank_caption"), (5, "duplicate_image"), (6, "punsafe_too_high"),
        (7, "too_small"), (8, "too_small")]
    assert_every_record_once(out, m, 8)
    # without --dedup the copies stay
    assert len(read_dataset(out)) + 1 == make([jsonl], str(tmp_path / "o2"), max_punsafe=0.5,
                                              min_image_size=16)["records_written"]


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    recs = synthetic_records(48, seed=3)
    return recs, write_webdataset(recs, str(tmp_path_factory.mktemp("wds")), seed=3)


def _outcome(out: str) -> tuple:
    manifest = json.load(open(os.path.join(out, "custom_dataset.manifest.json")))
    rejects = [(r["index"], r["reason"], r["detail"]) for r in read_rejects(out)]
    counts = {k: manifest[k] for k in ("input_records", "records_written", "records_rejected", "rejects_by_reason",
                                       "records_by_bucket")}
    return part_files(out), rejects, counts, [(p["block"], p["sha256"]) for p in manifest["parts"]]


def test_sharded_runs_merged_equal_the_unsharded_run(tmp_path, tars):
    recs, paths = tars
    flags = dict(input_format="webdataset", dedup=True, max_punsafe=0.5, per_part_file_num=4,
                 aspect_ratio_buckets="64", bucket_step=16)
    whole = str(tmp_path / "whole")
    make(paths, whole, **flags)
    expect = _outcome(whole)
    written, rejects = expected_counts(recs, "webdataset", max_punsafe=0.5, dedup=True)
    assert (expect[2]["records_written"], expect[2]["rejects_by_reason"]) == (written, rejects)
    assert rejects["duplicate_image"] >= 3
    # every duplicate's kept copy is in a block another shard of 3 owns: within-shard dedup would miss them
    index_of = {r.key: i for i, r in enumerate(r for r in recs if r.success)}
    first = {}
    for r in (r for r in recs if r.success):
        first.setdefault(r.image_id, index_of[r.key])
    dups = [i for i, reason, _ in expect[1] if reason == "duplicate_image"]
    owners = [((i // 4) % 3, (first[[r for r in recs if r.success][i].image_id] // 4) % 3) for i in dups]
    assert any(a != b for a, b in owners)

    sharded = str(tmp_path / "sharded")
    for k in range(3):  # shard 1 through a worker process: the hash-only tasks cross the pool too
        make(paths, sharded, num_shards=3, shard_id=k, num_workers=1 if k == 1 else 0, **flags)
    merge_shards(sharded, "custom_dataset", 3, 1, {})
    got = _outcome(sharded)
    assert got[0] == expect[0]  # the same part files, byte for byte
    assert got[1:] == expect[1:]


def test_resume_after_the_index_limit_decides_as_an_uninterrupted_run(tmp_path, tars):
    recs, paths = tars
    flags = dict(input_format="webdataset", dedup=True, per_part_file_num=4, aspect_ratio_buckets="64",
                 bucket_step=16)
    clean = str(tmp_path / "clean")
    make(paths, clean, **flags)
    out = str(tmp_path / "out")
    with pytest.raises(CreateDataError, match="--dedup_max_images 20 .*--resume"):
        make(paths, out, dedup_max_images=20, **flags)
    done = [json.loads(ln) for ln in open(os.path.join(out, "custom_dataset.journal.jsonl"))][1:]
    assert 2 <= sum("block" in d for d in done) < 12  # stopped part-way, finished blocks journaled
    res = create(paths, out, resume=True, **flags)
    assert 0 < res.processed < res.manifest["input_records"]  # finished blocks were hashed, not decoded again
    assert _outcome(out) == _outcome(clean)
