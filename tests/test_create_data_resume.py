"""create_pretraining_data.py: resume after an interruption, a really killed run, shards == unsharded run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import (ENTRY, ROOT, cli, create, filelist_names, good_corpus, image_bytes, make, part_files,
                     read_dataset, read_rejects, write_image, write_jsonl)
from data_tools.create_outputs import CreateDataError
from data_tools.filelists import read_filelist

DATA = os.path.join("laion400m_format_data", "custom_dataset")  # the parts folder of the default name


def _corpus_with_rejects(folder: str, n: int) -> str:
    """n good records with a missing image every 5th record, so parts and rejects both carry content."""
    jsonl, _ = good_corpus(folder, n)
    lines = open(jsonl, encoding="utf-8").read().splitlines()
    for i in range(2, n, 5):
        lines[i] = lines[i].replace("img/", "missing/")
    return write_jsonl(jsonl, lines)


def _stat(path: str):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@pytest.mark.unit
def test_resume_rewrites_only_what_is_missing(tmp_path):
    jsonl = _corpus_with_rejects(str(tmp_path / "in"), 23)
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    kw = dict(per_part_file_num=5, save_gzip_file=True)
    make([jsonl], clean, **kw)
    make([jsonl], out, **kw)
    data = os.path.join(out, DATA)
    # Interrupt: block 4's journal line torn mid-write and its part left half-written as .tmp; part 4 (block 3)
    # lost although its journal line landed.
    journal = os.path.join(out, "custom_dataset.journal.jsonl")
    lines = open(journal, "rb").read().splitlines(keepends=True)
    assert len(lines) == 1 + 2 * 5  # header + per block: its "writing" line, then its completion line
    assert lines[9] == b'{"writing":"part-000005.gz"}\n'
    with open(journal, "wb") as f:
        f.write(b"".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    os.remove(os.path.join(data, "part-000004.gz"))
    os.rename(os.path.join(data, "part-000005.gz"), os.path.join(data, "part-000005.gz.tmp"))
    with open(os.path.join(data, "part-000005.gz.tmp"), "r+b") as f:
        f.truncate(100)
    for p in ("manifest.json", "rejects.jsonl"):
        os.remove(os.path.join(out, f"custom_dataset.{p}"))  # a killed run never reached its end products
    kept = {i: _stat(os.path.join(data, f"part-00000{i}.gz")) for i in (1, 2, 3)}
    logs = []
    res = create([jsonl], out, log=logs.append, resume=True, **kw)
    assert res.processed == 5 + 3  # block 4 (5 records) and block 5 (3 records) only
    assert res.manifest["resumed_parts"] == 3
    assert any("torn last line" in m for m in logs)
    assert any("redoing block 3: part-000004.gz is missing" in m for m in logs)
    assert all(_stat(os.path.join(data, f"part-00000{i}.gz")) == kept[i] for i in (1, 2, 3))
    assert part_files(out) == part_files(clean)  # no .tmp left, every byte as in the clean run
    assert filelist_names(out) == filelist_names(clean)
    assert read_rejects(out) == read_rejects(clean)
    # Resuming a finished run decodes nothing and changes nothing.
    again = create([jsonl], out, log=logs.append, resume=True, **kw)
    assert again.processed == 0 and part_files(out) == part_files(clean)


@pytest.mark.unit
def test_resume_refuses_other_settings_and_changed_input(tmp_path):
    jsonl = _corpus_with_rejects(str(tmp_path / "in"), 6)
    out = str(tmp_path / "out")
    make([jsonl], out, per_part_file_num=2)
    with pytest.raises(CreateDataError, match="other settings"):
        make([jsonl], out, per_part_file_num=3, resume=True)
    with open(jsonl, "a") as f:
        f.write('{"caption": "late", "image": "img/0000.jpeg"}\n')
    with pytest.raises(CreateDataError, match="other inputs"):
        make([jsonl], out, per_part_file_num=2, resume=True)


def _processes_with_env(entry: str) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entry.encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # exited, or not ours (pid 1)
            continue
    return found


@pytest.mark.smoke  # starts a subprocess
def test_killed_run_lists_no_partial_part_and_resumes(tmp_path):
    # Big enough to still be running when its second part lands (~0.8 s of decoding), small enough to stay quick.
    folder = tmp_path / "in"
    for i in range(8):
        write_image(str(folder / f"img/{i}.png"), image_bytes(160, 160, "PNG", seed=i))
    jsonl = write_jsonl(str(folder / "k.jsonl"), [{"caption": f"c{i}", "image": f"img/{i % 8}.png"}
                                                  for i in range(400)])
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    args = ["--input_path", jsonl, "--per_part_file_num", "10", "--save_gzip_file", "--num_workers", "1"]
    marker = f"CREATE_DATA_KILLED_RUN={tmp_path}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CREATE_DATA_KILLED_RUN=str(tmp_path))
    proc = subprocess.Popen([sys.executable, ENTRY, *args, "--output_path", out], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = os.path.join(out, DATA, "part-000002.gz")
    deadline = time.monotonic() + 60
    while not os.path.exists(second) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed; make it bigger"
    # Its pool worker and forkserver notice and leave instead of blocking forever on a dead result pipe.
    deadline = time.monotonic() + 10
    while _processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_with_env(marker)
    filelist = os.path.join(out, "filelist", "custom_dataset.filelist")
    assert not os.path.exists(filelist)  # written only at the end, so it can never name a partial part
    r = cli(*args, "--output_path", out, "--resume")
    assert r.returncode == 0, r.stderr
    make([jsonl], clean, per_part_file_num=10, save_gzip_file=True)  # in-process: bytes do not depend on it
    assert not any(p.endswith(".tmp") for p in read_filelist(filelist))
    assert part_files(out) == part_files(clean) and filelist_names(out) == filelist_names(clean)
    assert len(read_dataset(out)) == 400


@pytest.mark.smoke  # starts a subprocess
def test_shards_together_equal_the_unsharded_run(tmp_path):
    jsonl = _corpus_with_rejects(str(tmp_path / "in"), 26)
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    kw = dict(per_part_file_num=4, save_gzip_file=True)
    make([jsonl], single, **kw)
    shard_manifests = [make([jsonl], sharded, num_shards=3, shard_id=k, **kw) for k in (2, 0, 1)]
    assert sorted(b for m in shard_manifests for b in m["blocks"]) == list(range(7))
    # Each shard is a dataset by itself; together they hold exactly the unsharded records.
    union = sorted(r for k in range(3) for r in read_dataset(sharded, f"custom_dataset.shard-{k}-of-3"))
    assert union == sorted(read_dataset(single))
    # Not merged yet: the combined name does not exist. Merging writes what the unsharded run wrote.
    assert not os.path.exists(os.path.join(sharded, "filelist", "custom_dataset.filelist"))
    r = cli("--merge_shards", "--output_path", sharded, "--num_shards", "3", "--num_repeat", "2")
    assert r.returncode == 0, r.stderr
    assert part_files(sharded) == part_files(single)
    assert filelist_names(sharded) == filelist_names(single) * 2
    assert read_rejects(sharded) == read_rejects(single)
    assert read_dataset(sharded) == read_dataset(single)


@pytest.mark.smoke  # starts a subprocess
def test_merge_refuses_unfinished_shards(tmp_path):
    jsonl = _corpus_with_rejects(str(tmp_path / "in"), 8)
    out = str(tmp_path / "out")
    make([jsonl], out, per_part_file_num=2, num_shards=2, shard_id=0)
    r = cli("--merge_shards", "--output_path", out, "--num_shards", "2")
    assert r.returncode == 1 and "1 of 2 shards are not finished" in r.stderr
    # A shard's run does not touch the other shard's parts, even with --overwrite.
    before = part_files(out)
    make([jsonl], out, per_part_file_num=2, num_shards=2, shard_id=1, overwrite=True)
    after = part_files(out)
    assert all(after[k] == v for k, v in before.items()) and len(after) == 4
    assert cli("--merge_shards", "--output_path", out, "--num_shards", "2").returncode == 0
