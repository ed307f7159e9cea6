"""create_pretraining_data.py against hostile and unlucky input (issue 14): one bad record never ends a run,
memory stays bounded, a dataset owns its files, a second writer is refused, a full disk names its file, pixels
are judged upright and 8-bit as the loader sees them. Every CLI case runs with a timeout: nothing may hang. Every
case keeps README's invariant: each input record ends in exactly one place (a part or the rejects file)."""
from __future__ import annotations

import fcntl
import io
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools import image_check as ic
from data_tools.fileio import sha256_file
from data_tools.filelists import read_filelist_list
from data_tools.pixels import upright_rgb8
from helpers import (ENTRY, ROOT, assert_every_record_once, cli, good_corpus, image_bytes, make, part_files,
                     read_dataset, read_rejects, write_image, write_jsonl)

TIMEOUT = 120


def _hostile_corpus(folder, allow_outside_root: bool = False) -> tuple:
    """(jsonl, [(line, reason)] of the rejects, kept captions, records): one record per hostile case, in order."""
    ok = image_bytes(40, 32, "JPEG")
    write_image(str(folder / "ok.jpg"), ok)
    os.mkfifo(folder / "fifo.jpg")
    os.mkdir(folder / "dir.jpg")
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    with open(folder / "sparse.jpg", "wb") as f:  # 2 GB, no disk used: rejected by its size, never read
        f.truncate(2 << 30)
    cases = [
        ('{"caption": "kept", "image": "ok.jpg"}', None),
        ('{"caption": ' + "[" * 10_000 + "]" * 10_000 + ', "image": "ok.jpg"}', ic.MALFORMED_JSON),  # RecursionError
        ('{"caption": "n", "image": "ok.jpg", "n": ' + "7" * 5000 + "}", ic.MALFORMED_JSON),  # int digits limit
        ("[" * 10_000 + "]" * 10_000, ic.MALFORMED_JSON),
        ('"just a string"', ic.NOT_OBJECT), ("42", ic.NOT_OBJECT), ("null", ic.NOT_OBJECT),
        ('{"caption": "\\ud800 lone surrogate", "image": "ok.jpg"}', ic.CAPTION_BAD_UNICODE),
        ('{"caption": "c", "image": "\\ud800.jpg"}', ic.RECORD_EXCEPTION),  # os.lstat cannot encode it
        ('{"caption": "c", "image": "\\udc80.jpg"}', ic.IMAGE_MISSING),  # byte 0x80 as a file name: the detail
        # names it with a lone surrogate, which the journal and rejects file must still write
        ('{"caption": 3.5, "image": "ok.jpg"}', ic.CAPTION_NOT_STRING),
        ('{"caption": ["a", "b"], "image": "ok.jpg"}', ic.CAPTION_NOT_STRING),
        ('{"caption": null, "image": "ok.jpg"}', ic.CAPTION_NOT_STRING),
        ('{"caption": "first", "caption": "last wins, as json.loads", "image": "ok.jpg"}', None),
        ('\ufeff{"caption": "a BOM inside the file", "image": "ok.jpg"}', ic.MALFORMED_JSON),
        ('{"caption": "raw\x00nul", "image": "ok.jpg"}', ic.MALFORMED_JSON),
        ('{"caption": "escaped \\u0000 nul", "image": "ok.jpg"}', None),
        ('{"caption": "crlf line", "image": "ok.jpg"}\r', None),
        ('{"caption": "' + "x" * 50_000 + '", "image": "ok.jpg"}', ic.LINE_TOO_LONG),
        (" " * 50_000, "blank"),  # an over-long blank line is still not a record
        ('{"caption": "c", "image": "fifo.jpg"}', ic.NOT_A_FILE),
        ('{"caption": "c", "image": "dir.jpg"}', ic.NOT_A_FILE),
        ('{"caption": "c", "image": "zero.jpg"}', ic.NOT_A_FILE if allow_outside_root else ic.OUTSIDE_ROOT),
        ('{"caption": "c", "image": "loop_a.jpg"}', ic.IMAGE_MISSING),
        ('{"caption": "c", "image": "sparse.jpg"}', ic.IMAGE_TOO_LARGE),
        ('{"caption": "no newline at the end", "image": "ok.jpg"}', None),
    ]
    jsonl = str(folder / "hostile.jsonl")
    with open(jsonl, "wb") as f:
        f.write(b"\xef\xbb\xbf")  # a BOM at the start of the file is allowed
        f.write("\n".join(text for text, _ in cases).encode("utf-8", "surrogatepass"))
    expected = [(n, reason) for n, (_, reason) in enumerate(cases, 1) if reason not in (None, "blank")]
    kept = ["kept", "last wins, as json.loads", "escaped   nul", "crlf line", "no newline at the end"]
    return jsonl, expected, kept, len(cases) - 1


@pytest.mark.unit
def test_one_bad_record_is_one_reject_and_resume_gets_through(tmp_path):
    jsonl, expected, kept, n = _hostile_corpus(tmp_path)
    out = str(tmp_path / "out")
    m = make([jsonl], out, per_part_file_num=4, max_line_bytes=30_000)
    rejects = read_rejects(out)
    assert [(r["line"], r["reason"]) for r in rejects] == expected
    details = {r["line"]: r["detail"] for r in rejects}
    assert "RecursionError" in details[2] and "ValueError" in details[3] and "UnicodeEncodeError" in details[9]
    assert details[10].endswith("/\udc80.jpg does not exist")  # read back as written
    assert "50035 bytes > --max_line_bytes 30000" in details[19]
    assert [c for c, _ in read_dataset(out)] == kept
    assert_every_record_once(out, m, n)
    # --resume of an interrupted run reads the same input and gets through it.
    os.remove(os.path.join(out, "custom_dataset.manifest.json"))
    resumed = make([jsonl], out, per_part_file_num=4, max_line_bytes=30_000, resume=True)
    assert read_rejects(out) == rejects and resumed["records_written"] == m["records_written"]


@pytest.mark.smoke  # starts a subprocess and its pool worker
def test_hostile_corpus_through_the_cli_with_a_worker(tmp_path):
    jsonl, expected, kept, n = _hostile_corpus(tmp_path, allow_outside_root=True)
    out = str(tmp_path / "out")
    r = cli("--input_path", jsonl, "--output_path", out, "--num_workers", "1", "--max_line_bytes", "30000",
            "--allow_outside_root", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert [(x["line"], x["reason"]) for x in read_rejects(out)] == expected
    with open(os.path.join(out, "custom_dataset.manifest.json")) as f:
        m = json.load(f)
    assert_every_record_once(out, m, n)
    assert [c for c, _ in read_dataset(out)] == kept


def _peak_rss_mb(*args: str) -> float:
    """Peak RSS of one CLI run in its own process (ru_maxrss of this process is monotonic, so not usable)."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, ENTRY, *args], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) / 1024


@pytest.mark.smoke  # starts subprocesses
def test_a_200_mb_line_costs_no_200_mb(tmp_path):
    write_image(str(tmp_path / "ok.jpg"), image_bytes())
    good = '{"caption": "fine", "image": "ok.jpg"}\n'
    small = write_jsonl(str(tmp_path / "small.jsonl"), [good.strip()])
    huge = str(tmp_path / "huge.jsonl")
    with open(huge, "wb") as f:  # a sparse 200 MB line: NUL bytes, no disk, read like any other bytes
        f.write(good.encode() + b'{"caption": "')
        f.seek(200 << 20, os.SEEK_CUR)
        f.write(b'", "image": "ok.jpg"}\n' + good.encode())
    base = _peak_rss_mb("--input_path", small, "--output_path", str(tmp_path / "a"), "--num_workers", "0")
    peak = _peak_rss_mb("--input_path", huge, "--output_path", str(tmp_path / "b"), "--num_workers", "0")
    assert peak - base < 60, (base, peak)  # the default --max_line_bytes is 16 MiB, the line 200 MiB
    [r] = read_rejects(str(tmp_path / "b"))
    assert (r["line"], r["reason"]) == (2, ic.LINE_TOO_LONG)
    assert [c for c, _ in read_dataset(str(tmp_path / "b"))] == ["fine", "fine"]


@pytest.mark.unit
def test_max_image_bytes(tmp_path):
    small, big = image_bytes(8, 8, "PNG"), image_bytes(64, 64, "PNG")
    write_image(str(tmp_path / "small.png"), small)
    write_image(str(tmp_path / "big.png"), big)
    jsonl = write_jsonl(str(tmp_path / "i.jsonl"), [{"caption": "s", "image": "small.png"},
                                                   {"caption": "b", "image": "big.png"}])
    out = str(tmp_path / "out")
    m = make([jsonl], out, max_image_bytes=len(small))
    [r] = read_rejects(out)
    assert r["reason"] == ic.IMAGE_TOO_LARGE and f"{len(big)} bytes > --max_image_bytes {len(small)}" in r["detail"]
    assert m["rejects_by_reason"] == {ic.IMAGE_TOO_LARGE: 1}
    assert_every_record_once(out, m, 2)


# ---- a dataset owns its files ----

@pytest.mark.unit
def test_two_names_in_one_folder_never_share_parts(tmp_path):
    a_in, a_expect = good_corpus(str(tmp_path / "a"), 6)
    b_in, _ = good_corpus(str(tmp_path / "b"), 9)
    out = str(tmp_path / "out")
    ma = make([a_in], out, output_name="a", per_part_file_num=2, save_gzip_file=True)
    a_parts = part_files(out, "a")
    make([b_in], out, output_name="b", per_part_file_num=2, save_gzip_file=True)
    make([b_in], out, output_name="b", per_part_file_num=3, save_gzip_file=True, overwrite=True)
    assert part_files(out, "a") == a_parts and read_dataset(out, "a") == a_expect  # a serves a's images
    assert_every_record_once(out, ma, 6, "a")
    assert sorted(os.listdir(os.path.join(out, "laion400m_format_data"))) == ["a", "b"]


@pytest.mark.unit
def test_overwrite_never_removes_a_foreign_part_even_through_a_symlinked_folder(tmp_path):
    jsonl, expect = good_corpus(str(tmp_path / "in"), 5)
    shared, out = tmp_path / "shared", tmp_path / "out"
    os.makedirs(shared / "custom_dataset")
    os.makedirs(out)
    os.symlink(shared, out / "laion400m_format_data")
    foreign_top = write_image(str(shared / "part-000003.gz"), b"someone else's part")
    make([jsonl], str(out), per_part_file_num=2, save_gzip_file=True)
    make([jsonl], str(out), per_part_file_num=2, save_gzip_file=True, overwrite=True)
    assert open(foreign_top, "rb").read() == b"someone else's part" and read_dataset(str(out)) == expect
    # A foreign file where this dataset would write: refused, nothing deleted, not even the dataset's own parts.
    foreign = write_image(str(shared / "custom_dataset" / "part-000007.gz"), b"not ours")
    before = part_files(str(out))
    r = cli("--input_path", jsonl, "--output_path", str(out), "--per_part_file_num", "2", "--save_gzip_file",
            "--overwrite", timeout=TIMEOUT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    seen_as = os.path.join(out, "laion400m_format_data", "custom_dataset", os.path.basename(foreign))
    assert f"error: {seen_as} is not a part that 'custom_dataset' wrote" in r.stderr
    assert part_files(str(out)) == before and read_dataset(str(out)) == expect


@pytest.mark.smoke  # starts a subprocess
def test_a_held_lock_refuses_a_second_writer_in_one_line(tmp_path):
    jsonl, expect = good_corpus(str(tmp_path / "in"), 4)
    out = str(tmp_path / "out")
    make([jsonl], out)
    before = part_files(out)
    lock = os.path.join(out, "custom_dataset.lock")
    with open(lock, "r+") as held:  # flock locks belong to an open file: this one conflicts with the CLI's
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        r = cli("--input_path", jsonl, "--output_path", out, "--overwrite", timeout=TIMEOUT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "another run is writing dataset 'custom_dataset'" in r.stderr and "pid 4242" in r.stderr
    assert part_files(out) == before and read_dataset(out) == expect
    # Another name in the same folder is another dataset with its own lock.
    assert cli("--input_path", jsonl, "--output_path", out, "--output_name", "other", timeout=TIMEOUT).returncode == 0


@pytest.mark.smoke  # starts pairs of subprocesses
@pytest.mark.parametrize("overwrite", [False, True])
def test_two_runs_started_together(tmp_path, overwrite):
    folder = tmp_path / "in"
    for i in range(8):
        write_image(str(folder / f"img/{i}.png"), image_bytes(96, 96, "PNG", seed=i))
    jsonl = write_jsonl(str(folder / "k.jsonl"), [{"caption": f"c{i}", "image": f"img/{i % 8}.png"}
                                                  for i in range(150)])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for trial in range(2):
        out = str(tmp_path / f"out{trial}")
        args = [sys.executable, ENTRY, "--input_path", jsonl, "--output_path", out, "--per_part_file_num", "20",
                "--save_gzip_file", "--num_workers", "0"] + (["--overwrite"] if overwrite else [])
        procs = [subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = [(p.wait(timeout=TIMEOUT), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        codes = sorted(code for code, _ in results)
        refusals = [err for code, err in results if code != 0]
        assert codes == ([0, 0] if overwrite and not refusals else [0, 1]), results
        for err in refusals:  # one clean line: the lock, or (started after the other finished) the finished output
            assert err.count("\n") == 1 and ("another run is writing" in err or "--overwrite" in err), err
        with open(os.path.join(out, "custom_dataset.manifest.json")) as f:
            m = json.load(f)
        assert_every_record_once(out, m, 150)  # includes: every part's sha256 matches the file on disk
        assert sorted(part_files(out)) == sorted(os.path.basename(p["path"]) for p in m["parts"])


@pytest.mark.smoke  # starts a subprocess
def test_a_full_disk_names_the_file_and_resume_completes(tmp_path):
    jsonl, expect = good_corpus(str(tmp_path / "in"), 60)
    out = str(tmp_path / "out")

    def small_disk():  # a file size limit fails writes as a full disk does (EFBIG instead of ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    r = subprocess.run([sys.executable, ENTRY, "--input_path", jsonl, "--output_path", out, "--num_workers", "0"],
                       capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, preexec_fn=small_disk,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    part_tmp = os.path.join(out, "laion400m_format_data", "custom_dataset", "part-000001.tmp")
    assert r.returncode == 1 and r.stderr == f"error: cannot write {part_tmp}: File too large\n", r.stderr
    assert not os.path.exists(os.path.join(out, "filelist", "custom_dataset.filelist"))
    r = cli("--input_path", jsonl, "--output_path", out, "--resume", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert read_dataset(out) == expect


# ---- pixels: upright and 8-bit, as the loader sees them ----

def _quadrants(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2:] = (0, 255, 0)
    arr[h // 2:, : w // 2] = (0, 0, 255)
    arr[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(arr, "RGB")


@pytest.mark.unit
def test_exif_orientation_is_applied_as_the_loader_applies_it(tmp_path):
    lines, originals = [], []
    for k in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = k
        buf = io.BytesIO()
        _quadrants(48, 32).save(buf, "JPEG", quality=95, exif=exif.tobytes())
        write_image(str(tmp_path / f"o{k}.jpg"), buf.getvalue())
        originals.append(buf.getvalue())
        lines.append({"caption": f"orientation {k}", "image": f"o{k}.jpg"})
    jsonl = write_jsonl(str(tmp_path / "o.jsonl"), lines)
    kept = make([jsonl], str(tmp_path / "kept"))
    assert [b for _, b in read_dataset(str(tmp_path / "kept"))] == originals  # original bytes: EXIF travels along
    small = make([jsonl], str(tmp_path / "small"), max_side=24)
    assert kept["records_written"] == small["records_written"] == 8
    for k, ((_, stored), original) in enumerate(zip(read_dataset(str(tmp_path / "small")), originals), 1):
        want = upright_rgb8(Image.open(io.BytesIO(original)))  # what the loader trains on from the original
        got = upright_rgb8(Image.open(io.BytesIO(stored)))  # what the loader trains on from the re-encode
        assert got.size == (round(want.size[0] * 24 / max(want.size)), round(want.size[1] * 24 / max(want.size)))
        assert got.size == ((16, 24) if k >= 5 else (24, 16))
        diff = np.abs(np.asarray(got, np.int16) - np.asarray(want.resize(got.size), np.int16))
        assert diff.mean() < 12, (k, diff.mean())


@pytest.mark.unit
def test_16_bit_and_float_images_keep_their_tones(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 64), (48, 1))
    buf16 = io.BytesIO()
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(buf16, "PNG")
    assert Image.open(io.BytesIO(buf16.getvalue())).mode.startswith("I")
    assert np.asarray(Image.open(io.BytesIO(buf16.getvalue())).convert("RGB")).mean() > 250  # the naive way: white
    buff = io.BytesIO()
    Image.fromarray(ramp.astype(np.float32), "F").save(buff, "TIFF")
    write_image(str(tmp_path / "g16.png"), buf16.getvalue())
    write_image(str(tmp_path / "f.tif"), buff.getvalue())
    jsonl = write_jsonl(str(tmp_path / "d.jsonl"), [{"caption": "16-bit", "image": "g16.png"},
                                                   {"caption": "float", "image": "f.tif"}])
    out = str(tmp_path / "out")
    m = make([jsonl], out, max_side=32)
    assert_every_record_once(out, m, 2)
    for caption, stored in read_dataset(out):
        arr = np.asarray(upright_rgb8(Image.open(io.BytesIO(stored))), np.float64)
        assert arr.shape == (24, 32, 3) and abs(arr.mean() - 127.5) < 6, (caption, arr.mean())
        assert arr[:, :4].mean() < 30 and arr[:, -4:].mean() > 225  # dark to light, not all white


# ---- paths ----

@pytest.mark.smoke  # starts a subprocess
def test_an_output_path_with_spaces_is_read_by_our_loader(tmp_path):
    jsonl, expect = good_corpus(str(tmp_path / "in put"), 5)
    out = str(tmp_path / "my data" / "out put")
    r = cli("--input_path", jsonl, "--output_path", out, "--output_name", "with space", "--per_part_file_num", "2",
            timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    listed = os.path.join(out, "filelist", "with space.filelist.list")
    [source] = read_filelist_list(listed)  # the loader's reader of .filelist.list lines `path [weight]`
    assert source.weight == 1.0 and len(source.parts) == 3
    assert all(os.path.isfile(p) and " " in p for p in source.parts)
    assert read_dataset(out, "with space") == expect


@pytest.mark.parametrize("flags,message", [
    (["--max_line_bytes", "0"], "error: --max_line_bytes must be >= 1, got 0"),
    (["--max_image_bytes", "-1"], "error: --max_image_bytes must be >= 1, got -1"),
    (["--output_name", ".."], "error: --output_name must be a plain file name, got '..'"),
    (["--output_name", "two\nlines"], "error: --output_name must be a plain file name, got 'two\\nlines'"),
    (["--progress_interval", "-1"], "error: --progress_interval must be >= 0, got -1.0"),
    (["--max_reject_ratio", "nan"], "error: --max_reject_ratio must be in 0..1, got nan"),
    (["--per_part_file_num", "many"], "error: argument --per_part_file_num: invalid int value: 'many'"),
])
@pytest.mark.smoke  # starts a subprocess
def test_bad_flags_stop_at_start_in_one_line(tmp_path, flags, message):
    r = cli("--input_path", "in.jsonl", "--output_path", str(tmp_path / "out"), *flags, timeout=TIMEOUT)
    assert (r.returncode, r.stderr) == (2, message + "\n")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.smoke  # starts a subprocess
def test_an_output_path_that_is_a_file_is_one_line(tmp_path):
    jsonl, _ = good_corpus(str(tmp_path / "in"), 1)
    digest = sha256_file(jsonl)
    r = cli("--input_path", jsonl, "--output_path", jsonl, timeout=TIMEOUT)
    assert (r.returncode, r.stderr) == (1, f"error: --output_path {jsonl} exists and is not a folder\n")
    assert sha256_file(jsonl) == digest
