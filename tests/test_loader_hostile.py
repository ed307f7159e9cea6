"""Hostile data against the streaming loader: nothing hangs, every bad record is a counted skip, memory stays
bounded, and a stream that cannot yield ends the run with one line (the source, the counts by reason, what to do).

Hang tests run the real DataLoader in a subprocess under a timeout (helpers.run_loader_loop): a hang is a
subprocess.TimeoutExpired, so the test fails instead of hanging the suite."""
from __future__ import annotations

import base64
import json
import os
import tracemalloc

import numpy as np
import pytest

from data_tools.part_format import encode_record, iter_part_lines
from helpers import (aes_line, image_bytes, records, run_loader_loop, truncated_jpeg, write_filelist_list,
                     write_part, write_source)
from trainer.loader.config import DataArguments
from trainer.loader.loader_state import LoaderStateTracker, load_state_file
from trainer.loader.sample_stream import LoaderError, WorkerStream
from trainer.loader.text_image_dataset import TextImageDataset

ONE_LINE = "trainer.loader.sample_stream.LoaderError: data loader ("


def _list(root, name: str, parts, **kw) -> str:
    return write_filelist_list(os.path.join(root, f"{name}.filelist.list"),
                               [(write_source(str(root), name, parts, **kw), None)])


def _stream(fl: str, **data_kw):
    data_kw.setdefault("caption_dropout_prob", 0.0)
    return TextImageDataset(DataArguments(fl, resolution=8, **data_kw), None, 1, seed=42).open_stream(0)


def _last_line(proc) -> str:
    """The main process's last line. A DataLoader worker may still log a skipped record after the main process
    printed its error (the workers end after it), so those warning lines are not the main process's."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if " worker " not in ln or "skipped record" not in ln]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------ no hang
@pytest.mark.smoke
@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_pixels_end_the_run_with_one_line(tmp_path, workers):
    """Headers parse, pixels do not: skipped at decode, counted there, and the limit in a row ends the run."""
    fl = _list(tmp_path, "cut", [[encode_record(f"c{i}", truncated_jpeg(i)) for i in range(40)]])
    proc = run_loader_loop({"file_list": fl, "resolution": 8, "max_consecutive_skips": 200, "buffer_size": 4},
                           workers)
    line = _last_line(proc)
    assert proc.returncode != 0 and line.startswith(ONE_LINE), proc.stderr[-3000:]
    assert "cut.filelist: 200 records in a row failed" in line and "bad_image=" in line
    assert "inspect_data.py" in line and "--max_consecutive_skips" in line


@pytest.mark.smoke
def test_zero_usable_records_with_zero_workers_ends_the_run(tmp_path):
    """The reference's default --dataloader_num_workers 0: a failure in paddle's reader thread used to leave the
    main thread waiting forever. Every record bad at parse time (and an empty part) ends it in seconds."""
    fl = _list(tmp_path, "junk", [[b"no tabs here\n"] * 30, []])
    proc = run_loader_loop({"file_list": fl, "resolution": 8, "max_consecutive_skips": 100}, 0)
    line = _last_line(proc)
    assert proc.returncode != 0 and line.startswith(ONE_LINE) and "bad_fields=" in line, proc.stderr[-3000:]


@pytest.mark.smoke
def test_a_bad_resume_state_with_zero_workers_ends_the_run(tmp_path):
    """A state that passes its checks but whose buffer points past the end of a part (the part was rewritten):
    the worker cannot re-read it; the run ends with one line saying what to delete."""
    fl = _list(tmp_path, "ok", [records("ok", 6, (12, 12))])
    ds = TextImageDataset(DataArguments(fl, resolution=8, buffer_size=3), None, 2, seed=1)
    tracker = LoaderStateTracker(ds)
    tracker.consume(next(iter(ds)))
    state = tracker.state_dict()
    state["workers"][0]["buffer"][0][3] = 999  # line 1000 of a 6-line part
    path = tmp_path / "loader_state_rank0.json"
    path.write_text(json.dumps(state))
    proc = run_loader_loop({"file_list": fl, "resolution": 8, "buffer_size": 3}, 0, state=str(path))
    line = _last_line(proc)
    assert proc.returncode != 0 and line.startswith(ONE_LINE), proc.stderr[-3000:]
    assert "has no record at line(s) [1000]" in line and "loader_state_rank*.json" in line


@pytest.mark.unit
def test_a_good_dataset_runs_through_the_same_loop(tmp_path):
    fl = _list(tmp_path, "fine", [records("f", 8, (12, 12))])
    ds = TextImageDataset(DataArguments(fl, resolution=8, buffer_size=2), None, 2, seed=1)
    tracker = LoaderStateTracker(ds)
    batches = iter(ds)
    for _ in range(3):
        assert tracker.consume(next(batches))["pixel_values"].shape == (2, 3, 8, 8)


@pytest.mark.unit
def test_the_error_batch_is_raised_by_consume(tmp_path):
    fl = _list(tmp_path, "cut", [[encode_record("c", truncated_jpeg())]])
    ds = TextImageDataset(DataArguments(fl, resolution=8, max_consecutive_skips=5), None, 2, seed=1)
    batches = iter(ds)
    last = next(batches)
    assert "loader_error" in last and "\n" not in last["loader_error"]
    with pytest.raises(LoaderError, match=r"cut\.filelist: 5 records in a row failed .*bad_image=5"):
        LoaderStateTracker(ds).consume(last)
    assert next(batches, None) is None  # the stream ends after its error


@pytest.mark.unit
def test_mixed_bad_and_good_records_never_trip_the_limit(tmp_path):
    """The limit counts failures in a row per source: one usable record resets it."""
    lines = []
    for i in range(60):
        lines += [encode_record(f"g{i}", image_bytes(12, 12, seed=i))] + [encode_record("x", truncated_jpeg())] * 3
    # 3 in 4 records bad: 60 in a row has odds 0.75^60 ~ 3e-8 per window; the default limit is 1000.
    stream = _stream(_list(tmp_path, "mixed", [lines]), max_consecutive_skips=60, buffer_size=4)
    got = [stream.next_sample().caption for _ in range(200)]
    assert set(got) <= {f"g{i}" for i in range(60)} and stream.skips.counts["bad_image"] > 100


# ------------------------------------------------------------------------------------------ record-level skips
@pytest.mark.unit
def test_every_record_failure_is_a_counted_skip(tmp_path):
    good = image_bytes(12, 12, seed=1)
    deep = "[" * 100_000 + "]" * 100_000  # RecursionError in json
    lines = [
        aes_line("fine", None, good),
        b"u\tNONE\t" + deep.encode() + b"\t1\t2\t" + base64.b64encode(good) + b"\n",
        b"u\tNONE\t{\"caption_en\": " + b"9" * 5000 + b"}\t1\t2\t" + base64.b64encode(good) + b"\n",  # 5000 digits
        aes_line("zero-byte image", None, b""),
        aes_line("caption is a list", None, good).replace(b'"caption_en": "caption is a list"',
                                                          b'"caption_en": ["a"]'),
        aes_line("fine-2", None, good),
    ]
    fl = _list(tmp_path, "aes", [lines], data_format="laion_aes")
    stream = _stream(fl, buffer_size=1)
    assert {stream.next_sample().caption for _ in range(6)} == {"fine", "fine-2"}
    assert stream.skips.counts["bad_json"] >= 2 and stream.skips.counts["bad_base64"] >= 1
    assert stream.skips.counts["no_caption"] >= 1


@pytest.mark.unit
def test_garbage_parts_unreadable_parts_and_a_huge_caption(tmp_path):
    """One source: a part of random bytes, a good part whose caption is 1 MB, an empty part, and a part that
    turns into a folder after start. The bad parts cost skips; the good records keep coming."""
    caption = "word " * 200_000
    fl = _list(tmp_path, "mix", [[b"x"], [encode_record(caption, image_bytes(12, 12))], [], [b"y"]])
    parts = os.path.join(str(tmp_path), "mix", "laion400m_format_data")
    with open(os.path.join(parts, "part-000000"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(20000))
    stream = _stream(fl, buffer_size=2)
    os.remove(os.path.join(parts, "part-000003"))
    os.mkdir(os.path.join(parts, "part-000003"))
    for _ in range(20):
        assert stream.next_sample().raw_caption == caption.strip()
    assert stream.skips.counts["unreadable_part"] >= 1 and stream.skips.counts["bad_fields"] >= 1


@pytest.mark.unit
@pytest.mark.parametrize("gzipped", [False, True])
def test_an_over_long_line_is_skipped_without_reading_it_whole(tmp_path, gzipped):
    huge = b"cap\tNONE\t" + b"A" * (40 << 20) + b"\n"  # 40 MB, gzip: 40 KB
    path = write_part(str(tmp_path / "p" / "part-000000"), [encode_record("a", b"x" * 10), huge,
                                                             encode_record("b", b"y" * 10)], gzipped)
    del huge
    tracemalloc.start()
    got = [(i, raw is None) for i, raw in iter_part_lines(path, 0, max_line_bytes=1 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [(0, False), (1, True), (2, False)]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while skipping a 40 MB line"
    # In the stream: its own reason, the lines around it kept, line numbers unchanged.
    good = [encode_record("a", image_bytes(12, 12, seed=1)), b"c\tNONE\t" + b"A" * 20000 + b"\n",
            encode_record("b", image_bytes(12, 12, seed=2))]
    stream = _stream(_list(tmp_path, "long", [good], gzipped=gzipped), max_line_bytes=8192, buffer_size=1)
    assert {stream.next_sample().ref[3] for _ in range(6)} == {0, 2}
    assert stream.skips.counts["line_too_long"] >= 1


@pytest.mark.unit
def test_an_image_over_the_pixel_cap_is_skipped(tmp_path):
    lines = [encode_record("big", image_bytes(400, 300, fmt="PNG")), encode_record("ok", image_bytes(20, 20))]
    stream = _stream(_list(tmp_path, "px", [lines]), max_image_pixels=100_000, buffer_size=1)
    assert {stream.next_sample().caption for _ in range(4)} == {"ok"}
    assert stream.skips.counts["too_large"] >= 1


# ------------------------------------------------------------------------------------------ resume state files
@pytest.mark.unit
def test_load_state_file_names_the_file(tmp_path):
    fl = _list(tmp_path, "ok", [records("ok", 6, (12, 12))])
    ds = TextImageDataset(DataArguments(fl, resolution=8, buffer_size=2), None, 2, seed=1)
    tracker = LoaderStateTracker(ds)
    tracker.consume(next(iter(ds)))
    good = tracker.state_dict()
    path = tmp_path / "loader_state_rank0.json"
    path.write_text(json.dumps(good))
    assert load_state_file(str(path)) == good
    bad_states = {
        "{not json": "not a readable loader state",
        b"\xff\xfe": "not a readable loader state",
        "[]": "expected a JSON object",
        json.dumps({**good, "version": 9}): "version 9",
        json.dumps({**good, "next_logical": 5}): "next_logical must be < 1",
        json.dumps({**good, "seed": "42"}): "seed must be an integer",
        json.dumps({**good, "workers": [{**good["workers"][0], "buffer": [[0, 0, 0, -1]]}]}): r"workers\[0\]\.buffer",
        json.dumps({**good, "workers": [{**good["workers"][0], "emitted": 1.5}]}): r"workers\[0\]\.emitted",
        json.dumps({**good, "skips_base": {"x": -1}}): "skips_base",
    }
    for text, message in bad_states.items():
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=f"^{path}: .*{message}") as e:
            load_state_file(str(path))
        assert "\n" not in str(e.value)
    os.remove(path)
    with pytest.raises(ValueError, match=f"^{path}: "):
        load_state_file(str(path))


# ------------------------------------------------------------------------------------------ the reference's shuffle
@pytest.mark.unit
def test_shuffle_every_n_samples_passes_the_stream_through_between_picks(tmp_path):
    fl = _list(tmp_path, "seq", [records("s", 200, (12, 12))])
    n, buf = 5, 8
    stream = _stream(fl, buffer_size=buf, shuffle_every_n_samples=n)
    lines = [stream.next_sample().ref[3] for _ in range(40)]
    # After the buffer fill (lines 0..7), insertion k reads line 8 + k. Emission e (e % n != 0) is insertion e.
    for e, line in enumerate(lines):
        if e % n:
            assert line == buf + e, (e, lines)
    assert any(line < buf for line in lines[::n])  # the picks draw from the buffer filled first
    # Deterministic and resumable: the state after 23 samples continues exactly.
    again = _stream(fl, buffer_size=buf, shuffle_every_n_samples=n)
    for _ in range(23):
        again.next_sample()
    tail = WorkerStream(again.sources, TextImageDataset(DataArguments(fl, resolution=8), None, 1, seed=42).layout,
                        0, again.transform, again.cfg, json.loads(json.dumps(again.state())))
    assert [tail.next_sample().ref[3] for _ in range(17)] == lines[23:]
