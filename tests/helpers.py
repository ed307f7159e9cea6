"""Shared helpers of the test suite: paths, tiny real images, datasets written by the real tools, loaders that
clean up their workers. Test modules import from here (never from each other); conftest.py holds fixtures only.
Nothing here mocks a library: every helper writes real files or runs real code."""
from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from data_tools.create_config import CreateDataArguments, resolve
from data_tools.create_data import RunResult, run
from data_tools.fileio import write_text_atomic
from data_tools.filelists import FILELIST_DIR_NAME, manifest_path, read_filelist, read_filelist_list
from data_tools.part_format import DATA_DIR_NAME, FORMAT_VERSION, encode_record, iter_part_lines, parse_record
from sd.paths import REPO_ROOT, TINY_INIT_DIR
from sd.tiny.make_demo_data import make_demo_parts

ROOT = REPO_ROOT
TINY_INIT = TINY_INIT_DIR
PY = sys.executable
ENTRY = os.path.join(ROOT, "create_pretraining_data.py")
make_parts = make_demo_parts  # the name the tests use: a demo dataset as part files, via the real data tool


def image_bytes(w: int = 40, h: int = 32, fmt: str = "JPEG", seed: int = 0, mode: str = "RGB") -> bytes:
    """A small image whose pixels depend on `seed`, so different records hash differently."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ---- loader datasets: parts, filelists and loaders written directly in the part format ----

def aes_line(caption_en: Optional[str], blip: Optional[str], img: bytes) -> bytes:
    """A laion_aes record: field 3 a JSON object with the captions, field 6 the base64 image."""
    meta = {k: v for k, v in (("caption_en", caption_en), ("blip_caption_en", blip)) if v is not None}
    fields = ["http://x/img.jpg", "NONE", json.dumps(meta), "0.9", "6.1", base64.b64encode(img).decode()]
    return "\t".join(fields).encode() + b"\n"


def write_part(path: str, lines: Sequence[bytes], gzipped: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"".join(lines)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gzipped else data)
    return path


def write_source(root: str, name: str, parts: Sequence[Sequence[bytes]], gzipped: bool = False,
                 data_format: Optional[str] = None, repeat: int = 1) -> str:
    """Parts under root/<name>/laion400m_format_data, a filelist naming them (relative paths, each part
    `repeat` times as the reference's num_repeat) and, when data_format is given, a manifest. Returns the
    .filelist path."""
    out = os.path.join(root, name)
    paths = [write_part(os.path.join(out, DATA_DIR_NAME, f"part-{i:06d}" + (".gz" if gzipped else "")),
                        lines, gzipped) for i, lines in enumerate(parts)]
    fl = os.path.join(out, FILELIST_DIR_NAME, f"{name}.filelist")
    os.makedirs(os.path.dirname(fl), exist_ok=True)
    rel = [os.path.relpath(p, os.path.dirname(fl)) for p in paths for _ in range(repeat)]
    write_text_atomic(fl, "\n".join(rel) + "\n")
    if data_format is not None:
        manifest = {"format_version": FORMAT_VERSION, "data_format": data_format,
                    "parts": [os.path.basename(p) for p in paths]}
        write_text_atomic(manifest_path(out, name), json.dumps(manifest))
    return fl


def write_filelist_list(path: str, entries: Sequence[Tuple[str, Optional[float]]]) -> str:
    lines = [fl if w is None else f"{fl} {w}" for fl, w in entries]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def records(tag: str, n: int, size: Tuple[int, int] = (24, 20), seed0: int = 0) -> List[bytes]:
    """n laion400m lines with captions `<tag>-<i>` and distinct tiny JPEGs."""
    return [encode_record(f"{tag}-{i}", image_bytes(size[0], size[1], seed=seed0 + i)) for i in range(n)]


def simple_dataset(root: str, sources: Sequence[Tuple[str, int, int, Optional[float]]], res_size=(24, 20),
                   gzipped: bool = False) -> Tuple[str, Dict[str, int]]:
    """A .filelist.list over sources (name, n_parts, records_per_part, weight) of laion400m parts whose
    captions are `<name>/p<part>-<i>`. Returns (path, records per source)."""
    entries, counts = [], {}
    for k, (name, n_parts, per_part, weight) in enumerate(sources):
        parts = [records(f"{name}/p{p}", per_part, res_size, seed0=1000 * k + 100 * p) for p in range(n_parts)]
        entries.append((write_source(root, name, parts, gzipped), weight))
        counts[name] = n_parts * per_part
    return write_filelist_list(os.path.join(root, "train.filelist.list"), entries), counts


@contextlib.contextmanager
def open_loader(dataset) -> Iterator:
    """An iterator over build_dataloader(dataset) whose worker processes are stopped on exit. Paddle's
    multi-process iterator is referenced by its own reader thread, so dropping it never collects it and its
    workers would live until the interpreter exits; _try_shutdown_all is what its __del__ would call."""
    from trainer.loader.text_image_dataset import build_dataloader

    it = iter(build_dataloader(dataset))
    try:
        yield it
    finally:
        shutdown = getattr(it, "_try_shutdown_all", None)
        if shutdown is not None:
            shutdown()


def run_tracked(dataset, n: int, state: Optional[dict], digest: Callable[[dict], str]):
    """Resume `dataset` from `state` (None: from the start), take n batches through the real DataLoader with a
    LoaderStateTracker, and return ([digest(batch) for each batch], tracker): the resume tests compare these
    digest lists between an uninterrupted run and a saved-then-resumed one."""
    from trainer.loader.loader_state import LoaderStateTracker

    if state is not None:
        dataset.load_state_dict(state)
    tracker = LoaderStateTracker(dataset)
    out = []
    with open_loader(dataset) as batches:
        for batch in batches:
            out.append(digest(tracker.consume(batch)))
            if len(out) == n:
                break
    return out, tracker


def image_transform(folder: str, resolution: int, **data_kw):
    """The loader's ImageTransform for image-only tests, configured as training configures it (DataArguments).
    DataArguments checks that its file list exists and the transform never reads it: an empty one is written."""
    from trainer.loader.config import DataArguments
    from trainer.loader.transforms import ImageTransform

    file_list = os.path.join(folder, "unused.filelist.list")
    write_text_atomic(file_list, "")
    return ImageTransform(DataArguments(file_list, resolution=resolution, **data_kw))


def truncated_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose header parses (so it passes the loader's header check) and whose pixels are cut off."""
    return image_bytes(64, 64, seed=seed)[:400]


# A training loop's view of the loader, in a fresh process: the real DataLoader (paddle's reader thread with 0
# workers, processes otherwise), LoaderStateTracker.consume on every batch. argv[1] is JSON: data (DataArguments
# fields), workers, batches, optional state (a loader_state_rank*.json path).
LOADER_LOOP = """
import json, sys
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import LoaderStateTracker, TextImageDataset, build_dataloader, load_state_file
kw = json.loads(sys.argv[1])
ds = TextImageDataset(DataArguments(**kw["data"]), None, 2, num_workers=kw["workers"], seed=1)
if kw.get("state"):
    ds.load_state_dict(load_state_file(kw["state"]))
tracker = LoaderStateTracker(ds)
for i, batch in enumerate(build_dataloader(ds)):
    tracker.consume(batch)
    if i + 1 >= kw.get("batches", 4):
        break
print("consumed", tracker.batches_consumed)
"""


def run_loader_loop(data: dict, workers: int, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """LOADER_LOOP in a subprocess; subprocess.TimeoutExpired (a hang) fails the calling test."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-c", LOADER_LOOP, json.dumps({"data": data, "workers": workers, **kw})],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def tiny_clip_tokenizer(folder: str):
    """A real paddlenlp CLIPTokenizer over a byte-level vocabulary written to `folder`."""
    from paddlenlp.transformers import CLIPTokenizer
    from paddlenlp.transformers.clip.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


# ---- the data tool: jsonl corpora, in-process and CLI runs, reading a dataset back ----

def write_image(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_jsonl(path: str, lines: Iterable[Union[dict, str]]) -> str:
    """dict lines are JSON-encoded; str lines are written verbatim (for malformed and blank lines)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ln in lines:
            f.write((json.dumps(ln, ensure_ascii=False) if isinstance(ln, dict) else ln) + "\n")
    return path


def good_corpus(folder: str, n: int) -> Tuple[str, List[Tuple[str, bytes]]]:
    """n valid records (mixed JPEG/PNG, RGB/L/RGBA/P) -> (jsonl path, [(caption, image bytes)])."""
    fmts = [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "L")]
    expect, lines = [], []
    for i in range(n):
        fmt, mode = fmts[i % len(fmts)]
        data = image_bytes(32 + i % 7, 24 + i % 5, fmt, seed=i, mode=mode)
        rel = f"img/{i:04d}.{fmt.lower()}"
        write_image(os.path.join(folder, rel), data)
        caption = f"a photo number {i}"
        lines.append({"caption": caption, "image": rel, "image_id": f"id_{i}"})
        expect.append((caption, data))
    return write_jsonl(os.path.join(folder, "data.jsonl"), lines), expect


def create(inputs: List[str], out: str, log=lambda m: None, **flags) -> RunResult:
    """One data-tool run in this process, configured as the CLI is (CreateDataArguments, then resolve); no pool
    (fast) unless num_workers is given."""
    flags.setdefault("num_workers", 0)
    return run(resolve(CreateDataArguments(input_path=inputs, output_path=out, **flags)), log=log)


def make(inputs: List[str], out: str, **flags) -> dict:
    """create(), returning the manifest."""
    return create(inputs, out, **flags).manifest


def read_dataset(out: str, name: str = "custom_dataset") -> List[Tuple[str, bytes]]:
    """Every record the filelist.list of NAME leads to, via part_format's reader (one per listed part)."""
    sources = read_filelist_list(os.path.join(out, "filelist", f"{name}.filelist.list"))
    records = []
    for src in sources:
        for part in dict.fromkeys(src.parts):  # num_repeat lists a part several times
            for _, raw in iter_part_lines(part):
                assert raw.count(b"\t") == 2 and raw.endswith(b"\n") and b"\n" not in raw[:-1]
                records.append(parse_record(raw, "laion400m"))
    return records


def read_rejects(out: str, name: str = "custom_dataset") -> List[dict]:
    with open(os.path.join(out, f"{name}.rejects.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def part_files(out: str, name: str = "custom_dataset") -> Dict[str, bytes]:
    """Every file in the parts folder of dataset NAME (laion400m_format_data/NAME/), by name."""
    folder = os.path.join(out, "laion400m_format_data", name)
    return {fn: open(os.path.join(folder, fn), "rb").read() for fn in sorted(os.listdir(folder))}


def filelist_names(out: str, name: str = "custom_dataset") -> List[str]:
    return [os.path.basename(p) for p in read_filelist(os.path.join(out, "filelist", f"{name}.filelist"))]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def assert_every_record_once(out: str, manifest: dict, n_records: int, name: str = "custom_dataset") -> None:
    """README's invariant: every input record ends in exactly one place, a part or the rejects file, and the
    manifest counts agree with what is on disk (parts matching their sha256)."""
    from data_tools.fileio import sha256_file

    rejects = read_rejects(out, name)
    indices = [r["index"] for r in rejects]
    assert len(set(indices)) == len(indices) == manifest["records_rejected"]
    assert len(read_dataset(out, name)) == manifest["records_written"]
    assert manifest["input_records"] == n_records == manifest["records_written"] + manifest["records_rejected"]
    assert sum(manifest["rejects_by_reason"].values()) == len(rejects)
    for p in manifest["parts"]:
        assert (os.path.getsize(p["path"]), sha256_file(p["path"])) == (p["bytes"], p["sha256"])
