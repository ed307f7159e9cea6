"""The loader with --aspect_ratio_buckets: one bucket per batch, the minimal crop, exact resume through the real
DataLoader, world-size-independent crops, a rare bucket, and resuming at another bucket set."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from data_tools.part_format import encode_record
from helpers import image_bytes, run_tracked, truncated_jpeg, write_filelist_list, write_source
from trainer.loader.config import DataArguments
from trainer.loader.loader_state import LoaderStateTracker
from trainer.loader.text_image_dataset import TextImageDataset, load_state_file

BUCKETS = "32"  # with --bucket_step 8: 24x40, 32x32, 40x24
SIZES = {"wide": (50, 30), "tall": (30, 50), "square": (36, 36), "wider": (64, 30)}
EXPECT = {"wide": (40, 24), "tall": (24, 40), "square": (32, 32), "wider": (40, 24)}


def _dataset(root: str, n: int = 10, rare: bool = False) -> str:
    """Two sources of mixed aspect ratios (captions "<kind>-<i>"), a truncated JPEG and a non-image, so the skip
    counters move; `rare`: a single tall image among wide and square ones."""
    kinds = ["wide", "square"] if rare else list(SIZES)
    parts = [[encode_record(f"{kinds[(i + p) % len(kinds)]}-{p}-{i}",
                            image_bytes(*SIZES[kinds[(i + p) % len(kinds)]], seed=100 * p + i)) for i in range(n)]
             for p in range(3)]
    if rare:
        parts[1].insert(3, encode_record("tall-rare", image_bytes(*SIZES["tall"], seed=999)))
    else:
        parts[1].insert(2, encode_record("bad-image", b"no image"))
        parts[2].insert(4, encode_record("truncated", truncated_jpeg(3)))
    a = write_source(root, "a", parts, gzipped=True)
    b = write_source(root, "b", [[encode_record(f"square-b-{i}", image_bytes(36, 36, seed=500 + i)) for i in range(4)]])
    return write_filelist_list(os.path.join(root, "train.filelist.list"), [(a, 0.7), (b, 0.3)])


def _ds(fl: str, batch: int = 3, workers: int = 0, rank: int = 0, world: int = 1, **kw) -> TextImageDataset:
    data = dict(resolution=32, buffer_size=4, random_flip=True, aspect_ratio_buckets=BUCKETS, bucket_step=8,
                caption_dropout_prob=0.3)
    data.update(kw)
    return TextImageDataset(DataArguments(fl, **data), None, batch, rank=rank, world_size=world, num_workers=workers,
                            seed=7)


def _bucket_digest(batch: dict) -> str:
    px = batch["pixel_values"].numpy()
    return f"{px.shape[3]}x{px.shape[2]}:" + hashlib.sha256(px.tobytes()).hexdigest()[:12]


def _run(ds: TextImageDataset, n: int, state: Optional[dict] = None) -> Tuple[List[str], LoaderStateTracker]:
    return run_tracked(ds, n, state, _bucket_digest)


@pytest.mark.unit
def test_every_batch_is_one_bucket_and_each_image_its_nearest(tmp_path):
    ds = _ds(_dataset(str(tmp_path)), batch=3)
    assert ds.buckets == ((24, 40), (32, 32), (40, 24))
    batcher = ds.open_batcher(ds.open_stream(0), 0)
    seen = Counter()
    for _ in range(12):
        bucket, pixels, samples = batcher.next_batch()
        assert pixels.shape == (3, 3, bucket[1], bucket[0]) and len(samples) == 3
        for s in samples:
            kind = s.raw_caption.split("-")[0]
            assert s.bucket == bucket == EXPECT[kind], s.raw_caption
            assert np.shares_memory(s.pixel_values, pixels)
        seen[bucket] += 1
        # between batches no bucket holds a full batch
        assert max(batcher.pending_counts().values()) < 3
    assert set(seen) == set(ds.buckets)
    assert batcher.stream.skips.counts["bad_image"] >= 1  # the truncated JPEG was met and skipped


@pytest.mark.unit
def test_a_single_square_bucket_is_exactly_the_square_path(tmp_path):
    fl = _dataset(str(tmp_path))
    square = _ds(fl, aspect_ratio_buckets=None, resolution=24)
    one = _ds(fl, aspect_ratio_buckets="24x24")
    a, b = square._batches(), one._batches()
    for _ in range(8):
        x, y = next(a), next(b)
        assert np.array_equal(x["pixel_values"], y["pixel_values"])


@pytest.mark.smoke
@pytest.mark.parametrize("workers,stop,rank,world", [(0, 5, 0, 1), (2, 5, 0, 1), (0, 4, 1, 2)])
def test_resume_with_buckets_is_exact(tmp_path, workers, stop, rank, world):
    fl = _dataset(str(tmp_path / "data"))
    kw = dict(workers=workers, rank=rank, world=world)
    full, full_tracker = _run(_ds(fl, **kw), 12)
    head, tracker = _run(_ds(fl, **kw), stop)
    assert head == full[:stop]
    saved = tracker.state_dict()
    assert any(w and w.get("pending") for w in saved["workers"]), "nothing was waiting in a bucket: a weak test"
    path = tmp_path / "loader_state_rank0.json"
    path.write_text(json.dumps(saved))
    tail, resumed = _run(_ds(fl, **kw), 12 - stop, state=load_state_file(str(path)))
    assert tail == full[stop:]
    assert resumed.bucket_samples() == full_tracker.bucket_samples()
    assert sum(resumed.bucket_samples().values()) == 12 * 3 and resumed.skip_counts() == full_tracker.skip_counts()


def _crops_by_ref(ds: TextImageDataset, logical: int, n: int) -> Dict[tuple, bytes]:
    out = {}
    batcher = ds.open_batcher(ds.open_stream(logical), logical)
    for _ in range(n):
        _, _, samples = batcher.next_batch()
        out.update((s.ref, (s.caption, s.pixel_values.tobytes())) for s in samples)
    return out


@pytest.mark.unit
def test_crops_and_caption_dropout_do_not_depend_on_the_world_size(tmp_path):
    fl = _dataset(str(tmp_path))
    one = _crops_by_ref(_ds(fl, batch=2), 0, 12)
    two = {**_crops_by_ref(_ds(fl, batch=2, rank=0, world=2), 0, 8),
           **_crops_by_ref(_ds(fl, batch=2, rank=1, world=2), 0, 8)}
    common = set(one) & set(two)
    assert len(common) >= 8
    assert all(one[r] == two[r] for r in common)


@pytest.mark.unit
def test_a_rare_bucket_waits_without_hanging_and_fills_in_a_later_epoch(tmp_path):
    ds = _ds(_dataset(str(tmp_path), n=6, rare=True), batch=3, buffer_size=2)
    batcher = ds.open_batcher(ds.open_stream(0), 0)
    tall_batches = []
    for i in range(80):
        bucket, _, samples = batcher.next_batch()
        assert max(batcher.pending_counts().values()) <= 2  # at most batch_size - 1 wait, per bucket
        if bucket == (24, 40):
            assert {s.raw_caption for s in samples} == {"tall-rare"}
            tall_batches.append([s.ref[1] for s in samples])  # the epochs of its records
    # One tall image per epoch: its bucket fills with that image from 3 epochs, then leaves; nothing is dropped.
    assert tall_batches, "the rare bucket never filled"
    assert all(len(set(epochs)) == 3 for epochs in tall_batches)


@pytest.mark.unit
def test_bucket_flags_are_checked_at_start(tmp_path):
    fl = _dataset(str(tmp_path))
    for bad in ({"aspect_ratio_buckets": "100"}, {"aspect_ratio_buckets": "33x32"}, {"bucket_step": 12},
                {"aspect_ratio_buckets": "32x32,32x32"}):
        with pytest.raises(ValueError, match="bucket"):
            DataArguments(fl, **bad)
    assert DataArguments(fl, aspect_ratio_buckets="512").buckets() == (
        (384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
    assert DataArguments(fl).buckets() is None


@pytest.mark.unit
def test_another_bucket_set_on_resume_needs_the_flag_and_regroups(tmp_path, caplog):
    fl = _dataset(str(tmp_path))
    _, tracker = _run(_ds(fl), 5)
    state = json.loads(json.dumps(tracker.state_dict()))
    waiting = sum(len(refs) for _, _, refs in state["workers"][0]["pending"])
    assert waiting
    with pytest.raises(ValueError, match="--allow_resolution_change"):
        _ds(fl, aspect_ratio_buckets="32x32,48x24").load_state_dict(state)
    with pytest.raises(ValueError, match="--allow_resolution_change"):
        _ds(fl, aspect_ratio_buckets=None).load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="trainer.loader"):
        ds = _ds(fl, aspect_ratio_buckets="32x32,48x24", allow_resolution_change=True)
        ds.load_state_dict(state)
    assert "regrouped" in caplog.text and f"{waiting} records" in caplog.text
    batcher = ds.open_batcher(ds.open_stream(0), 0)
    # The saved position is kept: the stream continues where it stopped, the waiting records are regrouped.
    assert batcher.stream.state()["inserted"] == state["workers"][0]["inserted"]
    assert sum(batcher.pending_counts().values()) == waiting
    for _ in range(4):
        bucket, pixels, _ = batcher.next_batch()
        assert bucket in ((32, 32), (48, 24)) and pixels.shape[2:] == (bucket[1], bucket[0])
    # Back to square crops with the flag: the one square bucket takes them all.
    sq = _ds(fl, aspect_ratio_buckets=None, allow_resolution_change=True)
    sq.load_state_dict(state)
    assert sum(sq.open_batcher(sq.open_stream(0), 0).pending_counts().values()) == waiting


@pytest.mark.unit
def test_inspect_data_writes_a_grid_per_bucket_and_the_counts(tmp_path, capsys):
    from data_tools import inspect_data
    from PIL import Image

    fl = _dataset(str(tmp_path / "data"))
    out = tmp_path / "inspect"
    rc = inspect_data.main(["--file_list", fl, "--aspect_ratio_buckets", BUCKETS, "--bucket_step", "8",
                            "--num_samples", "12", "--batch_size", "3", "--output_dir", str(out), "--seed", "7"])
    assert rc == 0
    rows = [json.loads(ln) for ln in open(out / "samples.jsonl", encoding="utf-8")]
    assert len(rows) == 12
    for k in range(0, 12, 3):  # batches of 3, one bucket each, each image in its nearest bucket
        assert len({r["bucket"] for r in rows[k:k + 3]}) == 1
    for r in rows:
        assert r["bucket"] == "%dx%d" % EXPECT[r["raw_caption"].split("-")[0]]
    counts = json.loads(capsys.readouterr().out.split("samples per bucket: ")[1].splitlines()[0])
    assert counts == {b: sum(r["bucket"] == b for r in rows) for b in ("24x40", "32x32", "40x24")}
    for name, n in counts.items():
        if n:
            w, h = map(int, name.split("x"))
            cols = int(np.ceil(np.sqrt(n)))
            rows_ = (n + cols - 1) // cols
            assert Image.open(out / f"grid_{name}.png").size == (cols * (w + 2) + 2, rows_ * (h + 2) + 2)
    assert not (out / "grid.png").exists()


@pytest.mark.unit
def test_a_stage_with_its_own_file_list_starts_it_from_the_beginning(tmp_path, caplog):
    """Each resolution stage of a latent run has its own latent dataset: another file list at another resolution
    starts that list from its beginning (with the flag); another list at the same resolution stays an error."""
    first, second = _dataset(str(tmp_path / "a")), _dataset(str(tmp_path / "b"), n=5)
    _, tracker = _run(_ds(first, aspect_ratio_buckets=None), 3)
    state = json.loads(json.dumps(tracker.state_dict()))
    with pytest.raises(ValueError, match="--allow_resolution_change"):
        _ds(second, aspect_ratio_buckets=None, resolution=64).load_state_dict(state)
    with pytest.raises(ValueError, match="another file list"):
        _ds(second, aspect_ratio_buckets=None, allow_resolution_change=True).load_state_dict(state)
    ds = _ds(second, aspect_ratio_buckets=None, resolution=64, allow_resolution_change=True)
    with caplog.at_level(logging.WARNING, logger="trainer.loader"):
        ds.load_state_dict(state)
    assert "starts from the beginning" in caplog.text
    assert ds.resume_plan.workers == [None] and ds.resume_plan.batches_consumed == 3


@pytest.mark.unit
def test_latent_datasets_refuse_buckets_in_one_line(tmp_path):
    from trainer.loader.latent_stream import refuse_buckets

    fl = _dataset(str(tmp_path))
    refuse_buckets(DataArguments(fl))  # square crops: fine
    with pytest.raises(ValueError, match="latent dataset.*square crops"):
        refuse_buckets(DataArguments(fl, aspect_ratio_buckets="64x64"))
