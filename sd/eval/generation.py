"""eval.py's generate command on one or many ranks: each rank draws its share of (guidance, prompt) units, writes
every image atomically, and rank 0 merges the ranks' index files into one index.json. A rerun resumes.

Work: the units are [(guidance, prompt) for guidance in --guidance_scales for prompt in prompts] in that order;
rank r of W takes units r, r + W, r + 2W, ... (sd/eval/distributed.share). A unit is all the images of one prompt at
one guidance (and its grid), so a unit's files come from one rank. Pixels do not depend on the split: image k of
prompt i always starts from image_seed(--seed, i, k) (sd/eval/evaluation.py), whatever the world size and batch
size (up to float rounding, <= 1/255 of a pixel, when a batch holds other prompts).

Files: images and grids are written by data_tools/fileio.atomic_writer, so a file under its final name is
complete. Each rank keeps OUTPUT_DIR/index.rank-<r>.json (its entries so far, rewritten after every batch, then
marked complete with the job's run id); rank 0 waits for every rank's complete file (sd/eval/distributed.py: no
collective), writes index.json in unit order and removes the rank files. Every entry records the `rank` that drew
the image.

Resume: before the job starts, every rank reads the entries of the folder's index.json and index.rank-*.json
files. A unit is kept when each of its entries equals the entry this run would write (prompt, seed, settings;
`rank` aside) and its files exist; anything else is drawn again. A folder of a run with other settings is refused
at start (resume_conflicts), so a kept image is always one this run would draw.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Sequence, Tuple

from data_tools.fileio import atomic_writer, write_json_atomic
from sd.config import to_jsonable
from sd.eval.args import EvalConfig
from sd.eval.distributed import EvalJob, share, wait_until
from sd.eval.evaluation import grid_columns, guidance_folder, image_file, image_seed, sample_images
from sd.images import grid

logger = logging.getLogger("sd.eval")

INDEX_NAME = "index.json"
RANK_INDEX_PATTERN = "index.rank-*.json"
Key = Tuple[float, int, int]  # (guidance, prompt index, image index)
Unit = Tuple[float, int]  # (guidance, prompt index)
# Settings that never change a pixel: a resumed run may differ in them.
PIXEL_NEUTRAL = {"sampling": ("batch_size", "device", "output_dir"),
                 "prompts": ("prompt", "prompt_file", "prompt_column", "prompt_format")}
PIXEL_SECTIONS = ("command", "model", "components", "sampling", "prompts", "unet_variant", "text_encoder_variant")


def rank_index_name(rank: int) -> str:
    return f"index.rank-{rank}.json"


def work_units(num_prompts: int, guidance_scales: Sequence[float]) -> List[Unit]:
    return [(float(g), i) for g in guidance_scales for i in range(num_prompts)]


def resume_conflicts(previous: Mapping, config: EvalConfig) -> List[str]:
    """What differs, in settings that change pixels, between a folder's saved eval_config.json and this run."""
    current = to_jsonable(config)
    conflicts = []
    for section in PIXEL_SECTIONS:
        old, new = previous.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            neutral = PIXEL_NEUTRAL.get(section, ())
            conflicts += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                          if k not in neutral and old.get(k) != new.get(k)]
        elif old != new:
            conflicts.append(f"{section}: {old!r} -> {new!r}")
    return conflicts


def entry_for(config: EvalConfig, prompt: str, guidance: float, i: int, k: int, rank: int) -> dict:
    s, p = config.sampling, config.prompts
    sub = guidance_folder(guidance, p.layout)
    return {"prompt": prompt, "negative_prompt": p.negative_prompt, "seed": image_seed(s.seed, i, k),
            "base_seed": s.seed, "prompt_index": i, "image_index": k, "scheduler": s.scheduler,
            "steps": s.num_inference_steps, "guidance": guidance, "height": s.height, "width": s.width,
            "unet": config.components.unet, "variant": config.unet_variant,
            "file": f"{sub}/{image_file(p.layout, i, k)}",
            "grid": f"{sub}/{i:05d}_grid.png" if p.layout == "eval" else None, "rank": rank}


def key_of(entry: Mapping) -> Key:
    return float(entry["guidance"]), int(entry["prompt_index"]), int(entry["image_index"])


def previous_entries(out_dir: str) -> Dict[Key, dict]:
    """Entries of the folder's index.json and rank index files (an earlier, perhaps interrupted, run)."""
    found: Dict[Key, dict] = {}
    paths = [os.path.join(out_dir, INDEX_NAME)] + sorted(glob.glob(os.path.join(out_dir, RANK_INDEX_PATTERN)))
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            entries = data["entries"] if isinstance(data, dict) else data
            found.update({key_of(e): e for e in entries})
        except (ValueError, KeyError, TypeError) as e:  # written atomically, so this is someone else's file
            raise ValueError(f"{path}: not an index written by eval.py ({e}); move it away to start over") from None
    return found


def _kept(old: List[dict], fresh: List[dict], out_dir: str) -> bool:
    drop = {"rank"}
    if any(o is None or {k: v for k, v in o.items() if k not in drop} != {k: v for k, v in f.items() if k not in drop}
           for o, f in zip(old, fresh)):
        return False
    files = {e["file"] for e in fresh} | {e["grid"] for e in fresh if e["grid"]}
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in files)


def _save_png(image, path: str) -> None:
    with atomic_writer(path) as f:
        image.save(f, format="PNG")


def generate_to_dir(pipe, prompts: Sequence[str], config: EvalConfig, job: EvalJob,
                    previous: Mapping[Key, dict]) -> List[dict]:
    """Draw this rank's share (minus what `previous` already holds), write its index file; on rank 0, wait for the
    other ranks and merge. Returns the merged index (rank 0) or this rank's entries."""
    if not prompts:
        raise ValueError("no prompts to generate")
    s, p, out = config.sampling, config.prompts, config.sampling.output_dir
    n = p.num_images_per_prompt
    mine: "OrderedDict[Unit, List[dict]]" = OrderedDict()
    todo: List[Unit] = []
    for g, i in share(work_units(len(prompts), s.guidance_scales), job.rank, job.world):
        fresh = [entry_for(config, prompts[i], g, i, k, job.rank) for k in range(n)]
        old = [previous.get((g, i, k)) for k in range(n)]
        kept = _kept(old, fresh, out)
        mine[(g, i)] = old if kept else fresh
        if not kept:
            todo.append((g, i))
    logger.info("rank %d of %d: %d prompt x guidance units, %d already written, drawing %d", job.rank, job.world,
                len(mine), len(mine) - len(todo), len(todo))
    for g in s.guidance_scales:
        os.makedirs(os.path.join(out, guidance_folder(g, p.layout)), exist_ok=True)
    for g in s.guidance_scales:
        units = [u for u in todo if u[0] == float(g)]
        for start in range(0, len(units), s.batch_size):
            batch = units[start:start + s.batch_size]
            images = sample_images(pipe, [prompts[i] for _, i in batch], [i for _, i in batch], s, g, s.height,
                                   s.width, n, p.negative_prompt)
            for unit, per_prompt in zip(batch, images):
                entries = mine[unit]
                for entry, image in zip(entries, per_prompt):
                    _save_png(image, os.path.join(out, entry["file"]))
                if entries[0]["grid"]:
                    _save_png(grid(per_prompt, grid_columns(len(per_prompt))), os.path.join(out, entries[0]["grid"]))
            _write_rank_index(out, job, mine, complete=False)
    _write_rank_index(out, job, mine, complete=True)
    if job.rank != 0:
        return [e for entries in mine.values() for e in entries]
    return merge_rank_indexes(out, job, work_units(len(prompts), s.guidance_scales))


def _write_rank_index(out: str, job: EvalJob, mine: Mapping[Unit, List[dict]], complete: bool) -> None:
    write_json_atomic(os.path.join(out, rank_index_name(job.rank)),
                      {"rank": job.rank, "world_size": job.world, "run_id": job.run_id, "complete": complete,
                       "entries": [e for entries in mine.values() for e in entries]}, indent=None)


def _read_complete(path: str, job: EvalJob):
    """A rank index file's entries once that rank of this job has finished, else None."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data["entries"] if data.get("run_id") == job.run_id and data.get("complete") else None


def merge_rank_indexes(out: str, job: EvalJob, units: Sequence[Unit]) -> List[dict]:
    """Rank 0: wait for every rank's complete index file, write index.json in unit order, remove the rank files
    (those of an earlier run with more ranks too: their entries are in index.json now or were drawn again)."""
    paths = [os.path.join(out, rank_index_name(r)) for r in range(job.world)]
    found: Dict[int, list] = {}

    def all_done() -> bool:
        for r, path in enumerate(paths):
            if r not in found:
                entries = _read_complete(path, job)
                if entries is not None:
                    found[r] = entries
        return len(found) == job.world

    waited = wait_until(all_done, f"the index files of {job.world} ranks in {out}")
    by_key = {key_of(e): e for entries in found.values() for e in entries}
    order = {unit: n for n, unit in enumerate(units)}
    merged = sorted(by_key.values(), key=lambda e: (order[(float(e["guidance"]), int(e["prompt_index"]))],
                                                    int(e["image_index"])))
    missing = len(units) - len({(float(e["guidance"]), int(e["prompt_index"])) for e in merged})
    if missing:
        raise RuntimeError(f"{missing} prompt x guidance units are in no rank's index: the split is broken")
    write_json_atomic(os.path.join(out, INDEX_NAME), merged)
    for path in glob.glob(os.path.join(out, RANK_INDEX_PATTERN)):
        os.remove(path)
    if job.world > 1:
        logger.info("merged %d ranks' indexes into %s (waited %.1f s for the other ranks)", job.world,
                    os.path.join(out, INDEX_NAME), waited)
    return merged
