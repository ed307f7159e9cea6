"""Sharding: every record exactly once per epoch across ranks x workers, whatever the part count; weighted
source choice honours the weights."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from helpers import open_loader, simple_dataset
from trainer.loader.sample_stream import SkipCounter, SourceCursor, fresh_cursor_state
from trainer.loader.sharding import (BY_LINE, BY_PART, WorkerLayout, assignment_table, choose_source,
                              epoch_part_order, sharding_mode, worker_parts)
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset


@pytest.mark.unit
@pytest.mark.parametrize("num_parts,G", [(1, 6), (2, 6), (5, 6), (6, 6), (7, 6), (13, 4), (3, 1), (1, 1)])
def test_assignment_partitions_every_epoch(num_parts, G):
    lines = [(7 * p) % 5 + 1 for p in range(num_parts)]  # uneven part lengths, some shorter than G
    everything = sorted((p, ln) for p in range(num_parts) for ln in range(lines[p]))
    for epoch in range(3):
        table = assignment_table(num_parts, lines, seed=3, source=1, epoch=epoch, global_workers=G)
        got = sorted(x for per_worker in table for x in per_worker)
        assert got == everything, f"epoch {epoch}: records lost or duplicated"
    assert sharding_mode(num_parts, G) == (BY_PART if num_parts >= G else BY_LINE)


@pytest.mark.unit
def test_every_worker_gets_data_with_one_part_and_six_workers():
    # 1 part of 20 lines, 2 ranks x 3 workers: line sharding, every worker has lines in every epoch.
    for epoch in range(4):
        table = assignment_table(1, [20], seed=0, source=0, epoch=epoch, global_workers=6)
        assert all(len(t) >= 3 for t in table), [len(t) for t in table]
    # A part shorter than G: workers without a line this epoch get lines in the following epochs.
    seen = collections.Counter()
    for epoch in range(6):
        for g, t in enumerate(assignment_table(1, [2], seed=0, source=0, epoch=epoch, global_workers=6)):
            seen[g] += len(t)
    assert set(seen) == set(range(6)) and all(v > 0 for v in seen.values())


@pytest.mark.unit
def test_part_order_is_shuffled_per_epoch_and_deterministic():
    orders = [epoch_part_order(40, seed=1, source=0, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] == epoch_part_order(40, seed=1, source=0, epoch=0)
    assert orders[0] != epoch_part_order(40, seed=2, source=0, epoch=0)
    assert worker_parts(40, 1, 0, 0, 3, 8) == orders[0][3::8]


@pytest.mark.unit
def test_layout_validation_and_global_ids():
    lay = WorkerLayout(rank=1, world_size=2, num_workers=3)
    assert lay.global_workers == 6 and [lay.global_id(w) for w in range(3)] == [3, 4, 5]
    assert WorkerLayout(0, 4, 0).global_workers == 4  # num_workers=0 still reads: one logical worker
    with pytest.raises(ValueError, match="rank"):
        WorkerLayout(2, 2, 1)
    with pytest.raises(ValueError, match="logical worker"):
        lay.global_id(3)


@pytest.mark.unit
def test_choose_source_follows_weights():
    cum = np.cumsum([0.6, 0.3, 0.1])
    counts = collections.Counter(choose_source(cum, 7, 0, i) for i in range(6000))
    for s, w in enumerate([0.6, 0.3, 0.1]):
        sd = (6000 * w * (1 - w)) ** 0.5
        assert abs(counts[s] - 6000 * w) < 4 * sd, counts


def _epoch0_refs(ds: TextImageDataset, logical: int) -> list:
    """Every record one global worker reads in epoch 0, through the real part-reading cursors."""
    out = []
    for i, spec in enumerate(ds.sources):
        cur = SourceCursor(i, spec, ds.layout, ds.layout.global_id(logical), ds.seed, ds.transform,
                           SkipCounter("test"), 50, fresh_cursor_state())
        while True:
            rec = cur.next_record()
            if rec.ref[1] > 0:
                break
            out.append((rec.caption, rec.ref))
    return out


@pytest.mark.unit
@pytest.mark.parametrize("n_parts,world,workers", [(1, 2, 3), (8, 2, 2), (3, 2, 2), (5, 1, 0)])
def test_real_parts_cover_each_record_once_per_epoch(tmp_path, n_parts, world, workers):
    # Source "d" repeats its part twice in the filelist (the reference's num_repeat): distinct entries.
    fl, counts = simple_dataset(str(tmp_path), [("s", n_parts, 7, None), ("d", 1, 5, None)], res_size=(8, 8))
    with open(fl) as f:
        body = f.read()
    dup_fl = body.splitlines()[1]
    with open(dup_fl) as f:
        part = f.read().strip()
    with open(dup_fl, "w") as f:
        f.write(f"{part}\n{part}\n")
    seen = collections.Counter()
    for rank in range(world):
        for logical in range(max(1, workers)):
            ds = TextImageDataset(DataArguments(fl, resolution=8), None, 1, rank, world, workers, seed=42)
            for caption, (s, _, part_idx, _) in _epoch0_refs(ds, logical):
                seen[(caption, part_idx if s == 1 else 0)] += 1
    expected = {(f"s/p{p}-{i}", 0) for p in range(n_parts) for i in range(7)}
    expected |= {(f"d/p0-{i}", k) for k in (0, 1) for i in range(5)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}, [k for k, v in seen.items() if v != 1]


@pytest.mark.unit
def test_dataset_stream_honours_source_weights(tmp_path):
    fl, _ = simple_dataset(str(tmp_path), [("a", 2, 10, 0.75), ("b", 1, 10, 0.25)], res_size=(8, 8))
    ds = TextImageDataset(DataArguments(fl, resolution=8, buffer_size=16, caption_dropout_prob=0.0),
                          None, 1, seed=42)
    it = ds.iter_samples(0)
    n = 1200
    from_a = sum(next(it).raw_caption.startswith("a/") for _ in range(n))
    sd = (n * 0.75 * 0.25) ** 0.5
    assert abs(from_a - 0.75 * n) < 4 * sd, from_a
    assert "by part" in ds.describe() and "by line" in TextImageDataset(
        DataArguments(fl, resolution=8), None, 1, 0, 2, 2, seed=42).describe()


@pytest.mark.smoke
def test_one_part_trains_on_two_ranks_of_three_workers(tmp_path):
    """The reference hung with fewer parts than workers; here every worker of every rank yields batches."""
    fl, _ = simple_dataset(str(tmp_path), [("one", 1, 9, None)], res_size=(8, 8))
    for rank in range(2):
        ds = TextImageDataset(DataArguments(fl, resolution=8, buffer_size=2), None, 2, rank, 2, 3, seed=42)
        with open_loader(ds) as batches:
            states = [json.loads(next(batches)["loader_state"]) for _ in range(6)]
        assert [s["global_worker"] for s in states] == [3 * rank + w for w in (0, 1, 2, 0, 1, 2)]
