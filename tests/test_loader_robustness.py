"""Bad data of every kind is skipped, counted by reason and reported; missing files are clear errors."""
from __future__ import annotations

import base64
import gzip
import logging
import os

import pytest

from data_tools.part_format import encode_record
from helpers import aes_line, image_bytes, open_loader, records, write_filelist_list, write_source
from trainer.loader.loader_state import LoaderStateTracker
from trainer.loader.config import DataArguments
from trainer.loader.sample_stream import MAX_CONSECUTIVE_FAILURES, SkipCounter, SourceCursor, fresh_cursor_state
from trainer.loader.text_image_dataset import TextImageDataset


def _read_epoch0(ds: TextImageDataset, source: int, max_fails: int = MAX_CONSECUTIVE_FAILURES) -> tuple:
    """(captions read in epoch 0, skip counts) of one source, for the only worker."""
    skips = SkipCounter("test")
    cur = SourceCursor(source, ds.sources[source], ds.layout, 0, ds.seed, ds.transform, skips, max_fails,
                       fresh_cursor_state())
    got = []
    while True:
        rec = cur.next_record()
        if rec.ref[1] > 0:
            return got, skips.counts
        got.append(rec.caption)


def _bad_dataset(root: str) -> str:
    good = image_bytes(12, 12, seed=1)
    lines = [encode_record("good-0", good),
             b"only one field\n",  # bad_fields
             b"cap\tNONE\t!!not base64!!\n",  # bad_base64
             encode_record("not an image", b"these bytes are no image"),  # bad_image at probe
             encode_record("tiny", image_bytes(4, 4, seed=2)),  # too_small (min_image_size=8)
             b"\xff\xfe\xfa\tNONE\t" + base64.b64encode(good) + b"\n",  # neither utf-8 nor gb18030
             encode_record("good-1", good)]
    s400m = write_source(root, "bad400m", [lines])
    aes = [aes_line("aes-good", None, good), b"a\tb\t{not json\td\te\tf\n", aes_line(None, None, good)]
    saes = write_source(root, "badaes", [aes], data_format="laion_aes")
    # A gzip part cut in the middle: the records before the damage are kept.
    full = gzip.compress(b"".join(records("gz", 40, size=(12, 12))))
    trunc = write_source(root, "trunc", [[b""]], gzipped=True)
    part = os.path.join(root, "trunc", "laion400m_format_data", "part-000000.gz")
    with open(part, "wb") as f:
        f.write(full[: len(full) // 2])
    return write_filelist_list(os.path.join(root, "bad.filelist.list"), [(s400m, 1), (saes, 1), (trunc, 1)])


@pytest.mark.unit
def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    fl = _bad_dataset(str(tmp_path))
    ds = TextImageDataset(DataArguments(fl, resolution=8, min_image_size=8), None, 1, seed=42)
    got, counts = _read_epoch0(ds, 0)
    assert got == ["good-0", "good-1"]
    assert counts == {"bad_fields": 1, "bad_base64": 1, "bad_image": 1, "too_small": 1, "bad_encoding": 1}
    got, counts = _read_epoch0(ds, 1)
    assert got == ["aes-good"] and counts == {"bad_json": 1, "no_caption": 1}
    got, counts = _read_epoch0(ds, 2)
    assert 0 < len(got) < 40 and got == [f"gz-{i}" for i in range(len(got))]
    assert counts == {"truncated_part": 1}


@pytest.mark.smoke
def test_counters_travel_through_dataloader_workers(tmp_path):
    fl = _bad_dataset(str(tmp_path))
    ds = TextImageDataset(DataArguments(fl, resolution=8, min_image_size=8, buffer_size=4), None, 4,
                          num_workers=2, seed=42)
    tracker = LoaderStateTracker(ds)
    with open_loader(ds) as batches:
        for i, batch in enumerate(batches):
            batch = tracker.consume(batch)
            if i == 40:
                break
    counts = tracker.skip_counts()
    for reason in ("bad_fields", "bad_base64", "bad_image", "too_small", "bad_encoding", "bad_json",
                   "no_caption", "truncated_part"):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    assert tracker.batches_consumed == 41 and list(batch["pixel_values"].shape) == [4, 3, 8, 8]


@pytest.mark.unit
def test_undecodable_pixels_skipped_at_emission(tmp_path):
    good = image_bytes(16, 16, seed=3)
    cut = image_bytes(64, 64, seed=4)[:400]  # header intact: passes the probe, fails to decode
    fl = write_filelist_list(os.path.join(tmp_path, "x.filelist.list"), [(write_source(
        str(tmp_path), "x", [[encode_record("ok", good), encode_record("cut", cut)]]), None)])
    stream = TextImageDataset(DataArguments(fl, resolution=8, caption_dropout_prob=0.0), None, 1,
                              seed=42).open_stream(0)
    assert {stream.next_sample().caption for _ in range(10)} == {"ok"}
    assert stream.skips.counts.get("bad_image", 0) >= 1


@pytest.mark.unit
def test_consecutive_failures_end_the_part_with_a_warning(tmp_path, caplog):
    bad = [b"garbage line\n"] * 30
    fl = write_filelist_list(os.path.join(tmp_path, "x.filelist.list"), [(write_source(
        str(tmp_path), "x", [bad + records("after", 3, (12, 12))]), None)])
    ds = TextImageDataset(DataArguments(fl, resolution=8), None, 1, seed=42)
    with caplog.at_level(logging.WARNING, logger="trainer.loader"):
        # Every epoch gives up after 5 bad lines, so the source never yields: an error naming it, no hang.
        with pytest.raises(RuntimeError, match=r"x\.filelist: no usable record"):
            _read_epoch0(ds, 0, max_fails=5)
    part = ds.sources[0].parts[0]
    assert any(part in r.getMessage() and "giving up on this part" in r.getMessage() for r in caplog.records)
    # Rate-limited: 5 bad-record lines + the abandonment per epoch, 20 epochs, far fewer warnings than skips.
    assert len(caplog.records) < 60

    got, counts = _read_epoch0(ds, 0)  # the loader's own limit, 50
    # 30 bad lines in epoch 0, and 30 more before the first good line of epoch 1 ends the helper's read.
    assert got == ["after-0", "after-1", "after-2"] and counts == {"bad_fields": 60}


@pytest.mark.unit
def test_missing_files_and_bad_config_are_clear_errors(tmp_path):
    fl = write_filelist_list(os.path.join(tmp_path, "ok.filelist.list"),
                             [(write_source(str(tmp_path), "x", [records("x", 2)]), None)])
    cfg = DataArguments(fl, resolution=8)
    with pytest.raises(FileNotFoundError, match="nope.filelist.list"):
        TextImageDataset(DataArguments(str(tmp_path / "nope.filelist.list")), None, 1, seed=42)
    missing_fl = write_filelist_list(os.path.join(tmp_path, "m.filelist.list"), [("gone.filelist", None)])
    with pytest.raises(FileNotFoundError, match="gone.filelist"):
        TextImageDataset(DataArguments(missing_fl), None, 1, seed=42)
    part = TextImageDataset(cfg, None, 1, seed=42).sources[0].parts[0]
    os.remove(part)
    with pytest.raises(FileNotFoundError, match="part-000000"):
        TextImageDataset(cfg, None, 1, seed=42)
    for field, value in (("resolution", 0), ("interpolation", "area"), ("caption_dropout_prob", 1.5),
                         ("buffer_size", 0), ("min_image_size", -1), ("data_format", "webdataset")):
        with pytest.raises(ValueError, match=field):
            DataArguments(fl, **{field: value})
    # The seed and the tokenizer's length belong to the training and model arguments: passed, and checked, here.
    with pytest.raises(ValueError, match="seed"):
        TextImageDataset(cfg, None, 1, seed=-1)
    with pytest.raises(ValueError, match="model_max_length"):
        TextImageDataset(cfg, object(), 1, seed=42, model_max_length=None)
    with pytest.raises(ValueError, match="batch_size"):
        TextImageDataset(cfg, None, 0, seed=42)
