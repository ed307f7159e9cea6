"""Benchmark create_pretraining_data.py against the reference's design, on the same input in the same run.

    python bench/bench_create_data.py [--records N] [--work_dir DIR] [--num_workers W]

Input: N records naming natural-looking 512-900 px JPEGs (100+ KB: gradients, multi-scale noise, shapes, blur),
generated once into --work_dir and reused by the records in a cycle. Both designs write gzipped parts of
--per_part_file_num records. Reference design (PaddleMIX create_pretraining_data.py): whole jsonl read into a
list, one multiprocessing.Process started per chunk, all at once, each writing gzip.open() at its default level
9, base64 of the raw bytes, no validation. Ours: the real CLI, which fully decodes every image.

Each design runs as a child process; its wall time gives records/s and a sampler sums the PSS (proportional set
size: shared copy-on-write pages counted once) of the child and all its descendants every 50 ms. Both designs
run at N and 4N records to show whether peak memory depends on the input size.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import multiprocessing
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

from sd.paths import REPO_ROOT as ROOT

ENTRY = os.path.join(ROOT, "create_pretraining_data.py")


# ----------------------------------------------------------------------------------------------- input
def make_jpeg(path: str, seed: int) -> None:
    """A photo-like JPEG: JPEG size tracks texture, so flat synthetic images would make the bench dishonest."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(512, 901, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), np.float32)
    for c in range(3):  # a soft colour gradient, like sky or a wall
        a, b = rng.uniform(-1, 1, 2)
        base[..., c] = rng.uniform(70, 180) + 60 * (a * xx / w + b * yy / h)
    im = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):  # objects
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x, y, x + int(rng.integers(40, 300)), y + int(rng.integers(40, 300))]
        color = tuple(int(v) for v in rng.integers(30, 226, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    img = np.asarray(im, np.float32)
    for scale, amp in ((1, 11.0), (3, 10.0), (12, 10.0), (48, 14.0), (192, 18.0)):  # texture: grain to blotches
        n = rng.normal(0, 1, (max(1, h // scale), max(1, w // scale), 1)).astype(np.float32)
        n = n + 0.25 * rng.normal(0, 1, n.shape[:2] + (3,)).astype(np.float32)  # mostly luminance, a little chroma
        up = Image.fromarray(((n + 4) * 32).clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        img += (np.asarray(up, np.float32) / 32 - 4) * amp
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5)).save(
        path, "JPEG", quality=92)


def prepare_input(work_dir: str, records: int, unique: int) -> str:
    img_dir = os.path.join(work_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(unique):
        path = os.path.join(img_dir, f"{i:05d}.jpg")
        if not os.path.isfile(path):  # cached across runs of the bench
            make_jpeg(path, seed=i)
    jsonl = os.path.join(work_dir, f"input_{records}.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(records):
            f.write(json.dumps({"caption": f"a photo of thing {i}", "image": f"images/{i % unique:05d}.jpg",
                                "image_id": f"bench_{i}"}) + "\n")
    return jsonl


# ----------------------------------------------------------------------------------------------- reference
def _reference_part(chunk: List[dict], path: str, root: str) -> None:
    with gzip.open(path, "wb") as f:
        for obj in chunk:
            with open(os.path.join(root, obj["image"]), "rb") as img:
                b64 = base64.b64encode(img.read()).decode()
            f.write(f"{obj['caption']}\tNONE\t{b64}\n".encode())


def reference_design(jsonl: str, out: str, per_part: int) -> None:
    with open(jsonl, encoding="utf-8") as f:
        data = [json.loads(ln) for ln in f]  # the whole input in memory
    data_dir = os.path.join(out, "laion400m_format_data")
    os.makedirs(data_dir, exist_ok=True)
    procs, parts = [], []
    for k, start in enumerate(range(0, len(data), per_part)):
        parts.append(os.path.join(data_dir, f"part-{k + 1:06d}.gz"))
        procs.append(multiprocessing.Process(target=_reference_part,
                                             args=(data[start:start + per_part], parts[-1], os.path.dirname(jsonl))))
    for p in procs:  # one process per chunk, all started at once
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"reference worker failed with exit code {p.exitcode}")
    os.makedirs(os.path.join(out, "filelist"), exist_ok=True)
    with open(os.path.join(out, "filelist", "custom_dataset.filelist"), "w") as f:
        f.write("".join(p + "\n" for p in parts))


# ----------------------------------------------------------------------------------------------- measuring
def _tree_pss_kb(root_pid: int) -> int:
    """PSS of root_pid and all its descendants (kB); processes that exit mid-scan are skipped."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):  # exited between listdir and open
                continue
            children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):  # exited, or a zombie without maps
            continue
    return total


def measure(cmd: List[str]) -> Tuple[float, float]:
    """(wall seconds, peak tree PSS in MB) of one child command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_kb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return seconds, peak[0] / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=400, help="N; the bench also runs 4N")
    ap.add_argument("--unique_images", type=int, default=48, help="distinct JPEGs the records cycle through")
    ap.add_argument("--per_part_file_num", type=int, default=100)
    ap.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work_dir", default=os.path.join("/tmp", "bench_create_data"))
    ap.add_argument("--_reference", nargs=3, metavar=("JSONL", "OUT", "PER_PART"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._reference:
        reference_design(args._reference[0], args._reference[1], int(args._reference[2]))
        return
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    t0 = time.perf_counter()
    rows = []
    for n in (args.records, 4 * args.records):
        jsonl = prepare_input(args.work_dir, n, args.unique_images)
        out_ref, out_ours = (os.path.join(args.work_dir, f"out_{d}_{n}") for d in ("ref", "ours"))
        ref = measure([sys.executable, os.path.abspath(__file__), "--_reference", jsonl, out_ref,
                       str(args.per_part_file_num)])
        ours = measure([sys.executable, ENTRY, "--input_path", jsonl, "--output_path", out_ours, "--overwrite",
                        "--save_gzip_file", "--per_part_file_num", str(args.per_part_file_num),
                        "--num_workers", str(args.num_workers)])
        with open(os.path.join(out_ours, "custom_dataset.manifest.json")) as f:
            written = json.load(f)["records_written"]
        if written != n:
            raise SystemExit(f"ours wrote {written} of {n} records")
        rows += [("reference", n, *ref), ("ours", n, *ours)]
        for out in (out_ref, out_ours):  # outputs are ~1.4x the input: keep only the cached images
            shutil.rmtree(out)
    sizes = [os.path.getsize(os.path.join(args.work_dir, "images", f)) for f in
             sorted(os.listdir(os.path.join(args.work_dir, "images")))[: args.unique_images]]
    print(f"input: {args.unique_images} JPEGs, {min(sizes) // 1024}-{max(sizes) // 1024} KB "
          f"(mean {sum(sizes) // len(sizes) // 1024} KB); {os.cpu_count()} CPUs; ours --num_workers "
          f"{args.num_workers}; parts of {args.per_part_file_num} records, gzip")
    print(f"{'design':<10}{'records':>9}{'seconds':>9}{'records/s':>11}{'peak PSS MB (tree)':>20}")
    for design, n, sec, pss in rows:
        print(f"{design:<10}{n:>9}{sec:>9.2f}{n / sec:>11.1f}{pss:>20.1f}")
    for i in (0, 2):
        (_, n, ref_s, ref_m), (_, _, our_s, our_m) = rows[i], rows[i + 1]
        print(f"N={n}: ours/reference throughput {ref_s / our_s:.2f}x, peak memory {our_m / ref_m:.2f}x")
    print(f"peak memory 4N/N: ours {rows[3][3] / rows[1][3]:.2f}x, reference {rows[2][3] / rows[0][3]:.2f}x")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"largest single process RSS over all runs: {maxrss:.1f} MB; bench took {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
