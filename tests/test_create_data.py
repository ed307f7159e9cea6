"""create_pretraining_data.py: round trip, captions, keys, every reject reason, image root, CLI exit codes, the
configuration (every flag of before, one error per bad value, the resolved run). Resume, kills and shards:
tests/test_create_data_resume.py."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from PIL import Image

from data_tools import image_check as ic
from data_tools.create_config import CreateDataArguments, resolve
from data_tools.create_data import run
from data_tools.fileio import sha256_file
from data_tools.filelists import read_filelist, read_manifest
from data_tools.part_format import sanitize_caption
from helpers import (ROOT, cli, filelist_names, good_corpus, image_bytes, make, part_files, read_dataset,
                     read_rejects, write_image, write_jsonl)
from sd.config import parse_args, to_jsonable


@pytest.mark.unit
@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_and_outputs(tmp_path, gz):
    jsonl, expect = good_corpus(str(tmp_path / "in"), 12)
    odd = ["tab\there", "new\nline", "cr\rreturn", "line\u2028sep", "para\u2029sep", "  padded  ", "中文 ✓ ünï",
           "nul\x00byte", "crlf\r\nend\x85nel"]
    lines = [json.loads(ln) for ln in open(jsonl)]
    for i, caption in enumerate(odd):
        lines[i]["caption"] = caption
        expect[i] = (sanitize_caption(caption), expect[i][1])
    write_jsonl(jsonl, lines)
    out = str(tmp_path / "out")
    m = make([jsonl], out, per_part_file_num=5, save_gzip_file=gz)
    got = read_dataset(out)  # asserts every line is one line with exactly 3 fields
    assert got == expect
    assert all("\t" not in c and "\n" not in c and "\u2028" not in c for c, _ in got)
    assert filelist_names(out) == [f"part-00000{i}" + (".gz" if gz else "") for i in (1, 2, 3)]
    assert all(os.path.isabs(p) for p in read_filelist(os.path.join(out, "filelist", "custom_dataset.filelist")))
    listed = open(os.path.join(out, "filelist", "custom_dataset.filelist.list")).read()
    assert listed == os.path.join(out, "filelist", "custom_dataset.filelist") + "\n"
    m = read_manifest(os.path.join(out, "custom_dataset.manifest.json"))  # format_version + data_format
    assert (m["records_written"], m["records_rejected"], m["input_records"]) == (12, 0, 12)
    assert [p["records"] for p in m["parts"]] == [5, 5, 2]
    for p in m["parts"]:
        assert (p["bytes"], p["sha256"]) == (os.path.getsize(p["path"]), sha256_file(p["path"]))
    assert {"created_by", "arguments", "rejects_by_reason", "num_repeat", "duration_s"} <= set(m)
    assert read_rejects(out) == []
    assert not [f for f in part_files(out) if f.endswith(".tmp")]
    assert os.listdir(os.path.join(out, "laion400m_format_data")) == ["custom_dataset"]  # its own folder


@pytest.mark.unit
def test_caption_and_image_keys(tmp_path):
    write_image(str(tmp_path / "a.png"), image_bytes(fmt="PNG"))
    jsonl = write_jsonl(str(tmp_path / "k.jsonl"), [{"text": "custom keys", "path": "a.png"},
                                                   {"caption": "default keys", "image": "a.png"}])
    out = str(tmp_path / "out")
    make([jsonl], out, caption_key="text", image_key="path")
    assert read_dataset(out) == [("custom keys", image_bytes(fmt="PNG"))]
    assert [(r["line"], r["reason"]) for r in read_rejects(out)] == [(2, ic.MISSING_CAPTION)]


def _bad_corpus(tmp_path):
    """Two input files; every reject reason except image_unreadable (test_unreadable_image)."""
    a, b = tmp_path / "a", tmp_path / "b"
    jpg = image_bytes(40, 32, "JPEG")
    png = image_bytes(40, 32, "PNG")
    write_image(str(a / "ok.jpg"), jpg)
    write_image(str(a / "big.png"), image_bytes(64, 64, "PNG"))
    write_image(str(a / "tiny.png"), image_bytes(8, 8, "PNG"))
    write_image(str(a / "empty.jpg"), b"")
    write_image(str(a / "text.jpg"), b"this is not an image\n")
    write_image(str(a / "trunc.jpg"), jpg[: len(jpg) // 2])
    write_image(str(a / "trunc.png"), png[:-12])  # pixel data complete, end chunk cut: verify() finds it
    write_image(str(tmp_path / "outside.jpg"), jpg)
    write_image(str(b / "img.png"), png)
    ok = {"caption": "fine", "image": "ok.jpg"}
    lines_a = [ok, "{not json", "[1, 2]", {"image": "ok.jpg"}, {"caption": 5, "image": "ok.jpg"},
               {"caption": " \t\u2028 ", "image": "ok.jpg"}, "", {"caption": "c"},
               {"caption": "c", "image": ["ok.jpg"]}, {"caption": "c", "image": "nope.jpg"},
               {"caption": "c", "image": "../outside.jpg"}, {"caption": "c", "image": "empty.jpg"},
               {"caption": "c", "image": "text.jpg"}, {"caption": "c", "image": "trunc.jpg"},
               {"caption": "c", "image": "trunc.png"}, {"caption": "c", "image": "big.png"},
               {"caption": "c", "image": "tiny.png"}]
    fa = write_jsonl(str(a / "a.jsonl"), lines_a)
    with open(fa, "ab") as f:
        f.write(b'{"caption": "\xff\xfe", "image": "ok.jpg"}\n')  # line 18: not UTF-8
    fb = write_jsonl(str(b / "b.jsonl"), [{"caption": "second", "image": "img.png"}, "   ",
                                          {"caption": "x", "image": "ok.jpg"}])  # ok.jpg is in a/, not b/
    expected = [(fa, 2, ic.MALFORMED_JSON), (fa, 3, ic.NOT_OBJECT), (fa, 4, ic.MISSING_CAPTION),
                (fa, 5, ic.CAPTION_NOT_STRING), (fa, 6, ic.BLANK_CAPTION), (fa, 8, ic.MISSING_IMAGE_KEY),
                (fa, 9, ic.IMAGE_NOT_STRING), (fa, 10, ic.IMAGE_MISSING), (fa, 11, ic.OUTSIDE_ROOT),
                (fa, 12, ic.EMPTY_FILE), (fa, 13, ic.NOT_AN_IMAGE), (fa, 14, ic.TRUNCATED), (fa, 15, ic.TRUNCATED),
                (fa, 16, ic.TOO_MANY_PIXELS), (fa, 17, ic.TOO_SMALL), (fa, 18, ic.MALFORMED_JSON),
                (fb, 3, ic.IMAGE_MISSING)]
    return [fa, fb], expected, [("fine", jpg), ("second", png)]


@pytest.mark.unit
def test_every_reject_reason(tmp_path):
    inputs, expected, good = _bad_corpus(tmp_path)
    out = str(tmp_path / "out")
    m = make(inputs, out, per_part_file_num=4, max_image_pixels=2000, min_image_size=16)
    rejects = read_rejects(out)
    assert [(r["source"], r["line"], r["reason"]) for r in rejects] == expected
    assert all(r["detail"] for r in rejects)
    assert [r["index"] for r in rejects] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18]
    hostile = {ic.LINE_TOO_LONG, ic.CAPTION_BAD_UNICODE, ic.NOT_A_FILE, ic.IMAGE_TOO_LARGE, ic.RECORD_EXCEPTION}
    # image_unreadable: test_unreadable_image; the others: tests/test_create_data_hostile.py
    assert {r for _, _, r in expected} == set(ic.REASONS) - {ic.IMAGE_UNREADABLE} - hostile
    assert read_dataset(out) == good
    # Every input record ends in exactly one place; blank lines are not records.
    assert m["input_records"] == 19 == m["records_written"] + m["records_rejected"]
    assert m["rejects_by_reason"] == {r: sum(1 for e in expected if e[2] == r) for _, _, r in expected}


@pytest.mark.unit
def test_allow_empty_caption(tmp_path):
    write_image(str(tmp_path / "a.jpg"), image_bytes())
    jsonl = write_jsonl(str(tmp_path / "e.jsonl"), [{"caption": " \n ", "image": "a.jpg"}])
    out = str(tmp_path / "out")
    make([jsonl], out, allow_empty_caption=True)
    assert read_dataset(out) == [("", image_bytes())]


@pytest.mark.unit
def test_paths_outside_root(tmp_path):
    root, data = tmp_path / "root", image_bytes()
    write_image(str(root / "in.jpg"), data)
    outside = write_image(str(tmp_path / "outside.jpg"), data)
    os.symlink(outside, root / "link.jpg")
    os.symlink(root / "in.jpg", root / "inner_link.jpg")
    names = ["../outside.jpg", outside, "link.jpg", str(root / "in.jpg"), "sub/../in.jpg", "inner_link.jpg"]
    jsonl = write_jsonl(str(tmp_path / "lists" / "p.jsonl"), [{"caption": n, "image": n} for n in names])
    out = str(tmp_path / "out")
    make([jsonl], out, image_root=str(root))
    assert [(r["line"], r["reason"]) for r in read_rejects(out)] == [(i, ic.OUTSIDE_ROOT) for i in (1, 2, 3)]
    assert [c for c, _ in read_dataset(out)] == names[3:]
    make([jsonl], out, image_root=str(root), allow_outside_root=True, overwrite=True)
    assert read_rejects(out) == [] and read_dataset(out) == [(n, data) for n in names]


@pytest.mark.unit
def test_max_side_downscales_and_keeps_small_images(tmp_path):
    big, small = image_bytes(64, 48, "PNG"), image_bytes(20, 10, "PNG")
    write_image(str(tmp_path / "big.png"), big)
    write_image(str(tmp_path / "small.png"), small)
    jsonl = write_jsonl(str(tmp_path / "m.jsonl"), [{"caption": "big", "image": "big.png"},
                                                   {"caption": "small", "image": "small.png"}])
    out = str(tmp_path / "out")
    make([jsonl], out, max_side=32, jpeg_quality=80)
    (_, got_big), (_, got_small) = read_dataset(out)
    with Image.open(io.BytesIO(got_big)) as im:
        assert (im.format, im.size) == ("JPEG", (32, 24))
    assert got_small == small


@pytest.mark.unit
def test_num_repeat(tmp_path):
    jsonl, expect = good_corpus(str(tmp_path / "in"), 5)
    out = str(tmp_path / "out")
    make([jsonl], out, per_part_file_num=2, num_repeat=3)
    assert filelist_names(out) == ["part-000001", "part-000002", "part-000003"] * 3
    assert read_dataset(out) == expect and read_manifest(os.path.join(out, "custom_dataset.manifest.json"))[
        "num_repeat"] == 3


@pytest.mark.smoke  # starts pool worker processes
def test_output_bytes_independent_of_worker_count(tmp_path):
    inputs, _, _ = _bad_corpus(tmp_path)
    jsonl, _ = good_corpus(str(tmp_path / "good"), 30)
    results = []
    for workers in (0, 1, 2):
        out = str(tmp_path / f"out{workers}")
        make(inputs + [jsonl], out, per_part_file_num=7, save_gzip_file=True, num_workers=workers,
             max_image_pixels=2000, min_image_size=16)
        results.append((part_files(out), filelist_names(out), read_rejects(out)))
    # 49 records in blocks of 7; block 2 (records 7..13) is all rejects, so it leaves no part.
    assert results[0][1] == [f"part-00000{i}.gz" for i in (1, 3, 4, 5, 6, 7)] and len(results[0][2]) == 17
    assert results[0] == results[1] == results[2]


@pytest.mark.smoke  # starts a subprocess
def test_cli_reject_ratio_exit_code_then_resume(tmp_path):
    inputs, _, _ = _bad_corpus(tmp_path)
    out = str(tmp_path / "out")
    limits = ["--max_image_pixels", "2000", "--min_image_size", "16", "--num_workers", "1"]
    r = cli("--input_path", *inputs, "--output_path", out, *limits, "--max_reject_ratio", "0.5")
    assert r.returncode == 3, r.stderr
    assert "--max_reject_ratio" in r.stderr and "17 of 19" in r.stderr
    assert os.path.isfile(os.path.join(out, "custom_dataset.rejects.jsonl"))
    assert not os.path.exists(os.path.join(out, "filelist", "custom_dataset.filelist"))
    r = cli("--input_path", *inputs, "--output_path", out, *limits, "--resume")
    assert r.returncode == 0, r.stderr
    assert "records/s" in r.stdout and "rejected      : 17" in r.stdout and "1 parts resumed" in r.stdout
    assert len(read_dataset(out)) == 2


@pytest.mark.smoke  # starts a subprocess
def test_cli_fatal_errors(tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing.jsonl")
    r = cli("--input_path", missing, "--output_path", out)
    assert r.returncode == 1 and f"cannot read input file {missing}: no such file" in r.stderr
    r = cli("--input_path", str(tmp_path), "--output_path", out)
    assert r.returncode == 1 and "is not a file" in r.stderr
    r = cli("--input_path", str(tmp_path / "*.nothing"), "--output_path", out)
    assert r.returncode == 1 and "matches no file" in r.stderr
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), ["", "  "])
    r = cli("--input_path", empty, "--output_path", out)
    assert r.returncode == 1 and "hold no records" in r.stderr
    jsonl, _ = good_corpus(str(tmp_path / "in"), 2)
    r = cli("--input_path", jsonl, "--output_path", jsonl)  # output folder path is a file: unwritable
    assert r.returncode == 1 and r.stderr.startswith("error:")
    assert cli("--input_path", jsonl, "--output_path", out, "--num_workers", "1").returncode == 0
    r = cli("--input_path", jsonl, "--output_path", out)  # same name again, neither --resume nor --overwrite
    assert r.returncode == 1 and "--overwrite" in r.stderr
    r = cli("--input_path", jsonl, "--output_path", out, "--num_workers", "1", "--overwrite")
    assert r.returncode == 0, r.stderr
    r = cli("--input_path", jsonl, "--output_path", out, "--shard_id", "3", "--num_shards", "2")
    assert r.returncode == 2 and r.stderr == "error: --shard_id must be in 0..1, got 3\n"  # a bad argument


@pytest.mark.unit
def test_globs_order_and_gzip_level(tmp_path):
    second, first = (good_corpus(str(tmp_path / d), 3) for d in ("b", "a"))
    sizes = {}
    for level in (0, 9):
        out = str(tmp_path / f"out{level}")
        m = make([str(tmp_path / "*" / "data.jsonl")], out, save_gzip_file=True, gzip_level=level)
        assert [i["path"] for i in m["inputs"]] == [first[0], second[0]]  # a glob expands sorted
        assert read_dataset(out) == first[1] + second[1]
        sizes[level] = m["parts"][0]["bytes"]
    assert sizes[9] < sizes[0]


@pytest.mark.unit
def test_unreadable_image(tmp_path):
    # Root reads any file whatever its mode, so use a regular file whose read() fails: offset 0 of a process's
    # memory is never mapped (EIO).
    jsonl = write_jsonl(str(tmp_path / "u.jsonl"), [{"caption": "c", "image": "/proc/self/mem"}])
    out = str(tmp_path / "out")
    make([jsonl], out, allow_outside_root=True)
    [r] = read_rejects(out)
    assert (r["line"], r["reason"]) == (1, ic.IMAGE_UNREADABLE) and "Input/output error" in r["detail"]


# ---- the configuration: one dataclass, the generated command line, the resolved run ----

def _parse(*argv: str) -> CreateDataArguments:
    (args,) = parse_args([CreateDataArguments], list(argv))
    return args


@pytest.mark.unit
def test_generated_parser_accepts_every_flag_of_before(tmp_path):
    with open(os.path.join(ROOT, "tests", "golden", "entry_flags.json")) as f:
        before = set(json.load(f)["entries"]["create_pretraining_data.py"])
    valued = {"--input_path": ["a.jsonl", "b/*.jsonl"], "--output_path": [str(tmp_path)], "--output_name": ["n"],
              "--caption_key": ["text"], "--image_key": ["path"], "--per_part_file_num": ["7"],
              "--num_repeat": ["2"], "--num_workers": ["3"], "--gzip_level": ["9"], "--image_root": [str(tmp_path)],
              "--max_image_pixels": ["100"], "--min_image_size": ["4"], "--max_side": ["64"],
              "--jpeg_quality": ["80"], "--num_shards": ["2"], "--shard_id": ["1"], "--max_reject_ratio": ["0.5"],
              "--progress_interval": ["9"]}
    bare = ["--save_gzip_file", "--allow_outside_root", "--allow_empty_caption", "--merge_shards", "--resume"]
    assert set(valued) | set(bare) | {"--overwrite"} == before
    args = _parse(*[x for flag, values in valued.items() for x in (flag, *values)], *bare)
    got = {f"--{k}": v for k, v in dataclasses.asdict(args).items()}
    assert got["--input_path"] == ["a.jsonl", "b/*.jsonl"] and got["--per_part_file_num"] == 7
    assert got["--max_reject_ratio"] == 0.5 and got["--image_root"] == str(tmp_path)
    assert all(got[flag] is True for flag in bare) and got["--overwrite"] is False
    assert _parse("--output_path", "o", "--input_path", "a", "--overwrite").overwrite is True
    assert _parse("--output_path", "o", "--input_path", "a", "--save_gzip_file", "False").save_gzip_file is False
    jsonl = write_jsonl(str(tmp_path / "d.jsonl"), [{"caption": "c", "image": "i.png"}])
    defaults = _parse("--output_path", "o", "--input_path", jsonl)  # the defaults of before, num_workers aside
    assert (defaults.per_part_file_num, defaults.num_repeat, defaults.gzip_level, defaults.jpeg_quality,
            defaults.max_image_pixels, defaults.output_name) == (1000, 1, 6, 95, 89_478_485, "custom_dataset")
    assert defaults.num_workers is None and resolve(defaults).num_workers == (os.cpu_count() or 1)


@pytest.mark.parametrize("flags,message", [
    ([], "--input_path is required (unless --merge_shards)"),
    (["--input_path", "a", "--output_name", "x/y"], "--output_name must be a plain file name, got 'x/y'"),
    (["--input_path", "a", "--per_part_file_num", "0"], "--per_part_file_num must be >= 1, got 0"),
    (["--input_path", "a", "--num_repeat", "0"], "--num_repeat must be >= 1, got 0"),
    (["--input_path", "a", "--num_workers", "-1"], "--num_workers must be >= 0, got -1"),
    (["--input_path", "a", "--gzip_level", "10"], "--gzip_level must be in 0..9, got 10"),
    (["--input_path", "a", "--max_image_pixels", "0"], "--max_image_pixels must be >= 1, got 0"),
    (["--input_path", "a", "--min_image_size", "-1"], "--min_image_size must be >= 0, got -1"),
    (["--input_path", "a", "--max_side", "0"], "--max_side must be >= 1, got 0"),
    (["--input_path", "a", "--jpeg_quality", "101"], "--jpeg_quality must be in 1..100, got 101"),
    (["--input_path", "a", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--input_path", "a", "--num_shards", "0"], "--num_shards must be >= 1, got 0"),
    (["--input_path", "a", "--num_shards", "2", "--shard_id", "2"], "--shard_id must be in 0..1, got 2"),
    (["--merge_shards"], "--merge_shards needs --num_shards >= 2, got 1"),
    (["--input_path", "a", "--max_reject_ratio", "1.5"], "--max_reject_ratio must be in 0..1, got 1.5"),
    (["--input_path", "a", "--image_root", "/no/such/folder"], "--image_root must be a folder, got /no/such/folder"),
])
@pytest.mark.unit
def test_a_bad_value_is_one_error_naming_its_flag(flags, message):
    with pytest.raises(ValueError) as e:
        _parse("--output_path", "out", *flags)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.unit
def test_resolved_run_is_frozen_and_is_what_the_manifest_records(tmp_path, monkeypatch):
    jsonl, _ = good_corpus(str(tmp_path / "in"), 4)
    monkeypatch.chdir(tmp_path)  # relative flags, as typed on a command line, resolve against the cwd
    args = _parse("--input_path", "in/*.jsonl", "--output_path", "out", "--image_root", "in", "--num_workers", "0",
                  "--per_part_file_num", "3")
    cfg = resolve(args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_workers = 2
    assert (cfg.input_files, cfg.image_roots) == ((jsonl,), (str(tmp_path / "in"),))
    assert (cfg.output_path, cfg.image_root, cfg.input_path) == (str(tmp_path / "out"), str(tmp_path / "in"),
                                                                ["in/*.jsonl"])
    assert args.output_path == "out" and args.image_root == "in"  # resolving made a new object
    m = run(cfg, log=lambda msg: None).manifest
    assert m["arguments"] == json.loads(json.dumps(to_jsonable(cfg)))
    # The journal's settings: the same keys as before the typed config, with the resolved image root.
    assert m["settings"] == cfg.part_settings() and m["settings"]["image_root"] == str(tmp_path / "in")
    assert set(m["settings"]) == {"caption_key", "image_key", "per_part_file_num", "save_gzip_file", "gzip_level",
                                  "allow_outside_root", "allow_empty_caption", "max_image_pixels", "min_image_size",
                                  "max_side", "jpeg_quality", "num_shards", "shard_id", "image_root",
                                  "max_image_bytes", "max_line_bytes"}
    with open(os.path.join(cfg.output_path, "custom_dataset.journal.jsonl")) as f:
        assert json.loads(f.readline())["settings"] == m["settings"]
