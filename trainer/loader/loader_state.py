"""Loader checkpoint state: what a batch carries, what the tracker saves, and how a save is resumed.

Paddle's DataLoader hands out batches round-robin starting at worker 0 and restarts its workers on every new
iterator, so the state of a rank is kept per *logical* worker: the tracker records, for each logical worker,
the state attached to the last batch consumed from it, plus which logical worker serves next. On resume,
physical worker p plays logical worker (p + next_logical) % W and every logical worker continues its own
stream, so the resumed batches are exactly those of a run that never stopped.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from trainer.loader.sample_stream import fresh_cursor_state

logger = logging.getLogger("trainer.loader")

STATE_FORMAT = "text_image_loader_state"
STATE_VERSION = 1


def stream_state_at_epochs(epochs: List[int]) -> dict:
    """A fresh worker stream whose sources start at the beginning of the given epochs."""
    return {"sources": [fresh_cursor_state(e) for e in epochs], "inserted": 0, "emitted": 0, "buffer": [],
            "skips": {}}


def batch_state(logical_worker: int, global_worker: int, stream_state: dict, batches: int) -> str:
    """The JSON string attached to a batch: the worker's state after that batch (counters included)."""
    return json.dumps({"logical_worker": logical_worker, "global_worker": global_worker,
                       "batches": batches, "stream": stream_state}, separators=(",", ":"))


def _sum_counts(base: Dict[str, int], workers: List[Optional[dict]]) -> Dict[str, int]:
    out = dict(base)
    for w in workers:
        for reason, n in (w or {}).get("skips", {}).items():
            out[reason] = out.get(reason, 0) + n
    return out


@dataclass
class ResumePlan:
    """What each logical worker of this rank starts from."""

    workers: List[Optional[dict]]  # stream state per logical worker; None: start fresh
    next_logical: int
    batches_consumed: int
    skips_base: Dict[str, int]
    exact: bool


def fresh_plan(workers_per_rank: int) -> ResumePlan:
    return ResumePlan([None] * workers_per_rank, 0, 0, {}, True)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"loader state: {msg}")


def plan_resume(state: Any, header: dict) -> ResumePlan:
    """Validate a saved tracker state against this dataset (`header`: rank, world_size, num_workers, seed,
    sources) and decide how each logical worker resumes.

    Same layout and seed: exact. Otherwise the streams cannot be mapped one to one, so every source restarts
    at the beginning of the smallest epoch any saved worker was in (no record of that epoch is lost, some
    are seen twice) and a warning says so. A different file list is an error: positions would point at
    other data."""
    _check(isinstance(state, dict), f"expected a JSON object, got {type(state).__name__}")
    _check(state.get("format") == STATE_FORMAT, f"format {state.get('format')!r} is not {STATE_FORMAT!r}")
    _check(state.get("version") == STATE_VERSION, f"version {state.get('version')!r} is not {STATE_VERSION}")
    for key in ("rank", "world_size", "num_workers", "seed", "sources", "batches_consumed", "next_logical",
                "skips_base", "workers"):
        _check(key in state, f"missing key {key!r}")
    saved_sources = [(s["filelist"], s["parts"]) for s in state["sources"]]
    current = [(s["filelist"], s["parts"]) for s in header["sources"]]
    if saved_sources != current:
        raise ValueError(
            "loader state was saved for another file list (filelist, parts): saved "
            f"{saved_sources}, now {current}. Delete the checkpoint's loader_state_rank*.json to restart the "
            "data stream from the beginning.")
    workers: List[Optional[dict]] = state["workers"]
    _check(isinstance(workers, list) and len(workers) == max(1, state["num_workers"]),
           f"'workers' must list {max(1, state['num_workers'])} entries")
    for i, w in enumerate(workers):
        _check(w is None or (isinstance(w, dict) and len(w.get("sources", [])) == len(current)),
               f"workers[{i}] does not have one cursor per source")
    same_layout = (state["world_size"], state["num_workers"]) == (header["world_size"], header["num_workers"])
    if same_layout and state["seed"] == header["seed"]:
        _check(state["rank"] == header["rank"],
               f"saved by rank {state['rank']} but loaded by rank {header['rank']}")
        return ResumePlan(list(workers), int(state["next_logical"]), int(state["batches_consumed"]),
                          dict(state["skips_base"]), True)
    saved = [w for w in workers if w is not None]
    epochs = [min((w["sources"][s]["epoch"] for w in saved), default=0) for s in range(len(current))]
    logger.warning(
        "loader state saved with world_size=%s num_workers=%s seed=%s, resuming with world_size=%s "
        "num_workers=%s seed=%s: the sample order is no longer exact. Every source restarts at the beginning "
        "of its smallest saved epoch %s (records of that epoch already seen will be seen again) and the "
        "shuffle buffers start empty.", state["world_size"], state["num_workers"], state["seed"],
        header["world_size"], header["num_workers"], header["seed"], epochs)
    per_rank = max(1, header["num_workers"])
    return ResumePlan([stream_state_at_epochs(epochs) for _ in range(per_rank)], 0,
                      int(state["batches_consumed"]), _sum_counts(state["skips_base"], workers), False)


class LoaderStateTracker:
    """Records what the training loop consumed, so that a checkpoint can resume the data stream exactly."""

    def __init__(self, dataset: Any):
        self._header: dict = dataset.state_header()
        plan: ResumePlan = dataset.resume_plan
        self._workers: List[Optional[dict]] = list(plan.workers)
        self._next = plan.next_logical
        self._batches = plan.batches_consumed
        self._skips_base = dict(plan.skips_base)

    def consume(self, batch: dict) -> dict:
        """Pops "loader_state" from a batch, records it and returns the batch without it."""
        if "loader_state" not in batch:
            raise KeyError("batch has no 'loader_state': was it produced by TextImageDataset through "
                           "build_dataloader()?")
        raw = batch.pop("loader_state")
        st = json.loads(raw if isinstance(raw, str) else str(raw))
        logical = st["logical_worker"]
        if logical != self._next:
            # The exact-resume mapping assumes paddle serves workers round-robin; say so loudly if not.
            raise RuntimeError(f"expected the next batch from logical worker {self._next}, got one from "
                               f"{logical}: the DataLoader did not serve its workers round-robin")
        stream = st["stream"]
        stream["batches"] = st["batches"]
        self._workers[logical] = stream
        self._next = (logical + 1) % len(self._workers)
        self._batches += 1
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable; exactly what TextImageDataset.load_state_dict() takes."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._header,
                "batches_consumed": self._batches, "next_logical": self._next,
                "skips_base": dict(self._skips_base), "workers": [w and dict(w) for w in self._workers]}

    def skip_counts(self) -> Dict[str, int]:
        """Skipped records by reason, summed over this rank's workers, cumulative across resumes."""
        return _sum_counts(self._skips_base, self._workers)

    @property
    def batches_consumed(self) -> int:
        return self._batches
