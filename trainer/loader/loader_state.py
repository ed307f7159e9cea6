"""Loader checkpoint state: what a batch carries, what the tracker saves, and how a save is resumed.

Paddle's DataLoader hands out batches round-robin starting at worker 0 and restarts its workers on every new
iterator, so the state of a rank is kept per *logical* worker: the tracker records, for each logical worker,
the state attached to the last batch consumed from it, plus which logical worker serves next. On resume,
physical worker p plays logical worker (p + next_logical) % W and every logical worker continues its own
stream, so the resumed batches are exactly those of a run that never stopped.

A saved state is untrusted input: `load_state_file` (what a trainer resumes from) and `plan_resume` check every
field's type and range before any of it is used, and name the file and the field when one is wrong.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from trainer.loader.sample_stream import LoaderError, fresh_cursor_state

logger = logging.getLogger("trainer.loader")

STATE_FORMAT = "text_image_loader_state"
STATE_VERSION = 1
ERROR_KEY = "loader_error"  # the last batch of a failed stream: {ERROR_KEY: one line}, raised by consume()
_CURSOR_KEYS = ("epoch", "pos", "line", "fails", "hits", "empty")


def stream_state_at_epochs(epochs: List[int]) -> dict:
    """A fresh worker stream whose sources start at the beginning of the given epochs."""
    return {"sources": [fresh_cursor_state(e) for e in epochs], "inserted": 0, "emitted": 0, "buffer": [],
            "skips": {}}


def batch_state(logical_worker: int, global_worker: int, stream_state: dict, batches: int,
                bucket: Optional[str] = None) -> str:
    """The JSON string attached to a batch: the worker's state after that batch (counters included), and the
    batch's aspect-ratio bucket ("WxH") when the loader buckets."""
    st = {"logical_worker": logical_worker, "global_worker": global_worker, "batches": batches, "stream": stream_state}
    if bucket is not None:
        st["bucket"] = bucket
    return json.dumps(st, separators=(",", ":"))


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
    regroup: bool = False  # the bucket set changed: the saved pending records go to their new buckets
    bucket_samples: Dict[str, int] = field(default_factory=dict)  # samples trained per bucket so far


def fresh_plan(workers_per_rank: int) -> ResumePlan:
    return ResumePlan([None] * workers_per_rank, 0, 0, {}, True)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"loader state: {msg}")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_counts(d: Any, what: str) -> None:
    _check(isinstance(d, dict) and all(isinstance(k, str) and _is_count(v) for k, v in d.items()),
           f"{what} must map reasons to counts >= 0")


def _check_stream(w: Any, i: int, n_sources: int) -> None:
    what = f"workers[{i}]"
    _check(isinstance(w, dict), f"{what} must be an object or null")
    for key in ("inserted", "emitted"):
        _check(_is_count(w.get(key)), f"{what}.{key} must be an integer >= 0")
    _check(w.get("batches", 0) is None or _is_count(w.get("batches", 0)), f"{what}.batches must be an integer >= 0")
    cursors = w.get("sources")
    _check(isinstance(cursors, list) and len(cursors) == n_sources, f"{what} does not have one cursor per source")
    for j, c in enumerate(cursors):
        _check(isinstance(c, dict) and all(_is_count(c.get(k)) for k in _CURSOR_KEYS) and _is_count(c.get("bad", 0)),
               f"{what}.sources[{j}] must hold integers >= 0 for {list(_CURSOR_KEYS)}")
    buffer = w.get("buffer")
    _check(_is_refs(buffer), f"{what}.buffer must be a list of [source, epoch, part, line] integers >= 0")
    pending = w.get("pending", [])  # absent from states saved before aspect-ratio buckets
    _check(isinstance(pending, list) and all(
        isinstance(p, list) and len(p) == 3 and _is_count(p[0]) and _is_count(p[1]) and _is_refs(p[2])
        for p in pending), f"{what}.pending must be a list of [width, height, [[source, epoch, part, line], ...]]")
    _check_counts(w.get("skips"), f"{what}.skips")


def _is_refs(refs: Any) -> bool:
    return isinstance(refs, list) and all(isinstance(r, list) and len(r) == 4 and all(map(_is_count, r))
                                          for r in refs)


def check_state(state: Any, workers: bool = True) -> None:
    """Every field of a saved tracker state has the type and range the loader relies on (ValueError naming the
    field otherwise); `workers=False` checks all but the per-worker streams. What it must match in the dataset
    (file list, layout) is plan_resume's to check."""
    _check(isinstance(state, dict), f"expected a JSON object, got {type(state).__name__}")
    _check(state.get("format") == STATE_FORMAT, f"format {state.get('format')!r} is not {STATE_FORMAT!r}")
    _check(state.get("version") == STATE_VERSION, f"version {state.get('version')!r} is not {STATE_VERSION}")
    for key in ("rank", "world_size", "num_workers", "seed", "sources", "batches_consumed", "next_logical",
                "skips_base", "workers"):
        _check(key in state, f"missing key {key!r}")
    for key in ("rank", "num_workers", "seed", "batches_consumed", "next_logical"):
        _check(_is_count(state[key]), f"{key} must be an integer >= 0, got {state[key]!r}")
    _check(_is_count(state["world_size"]) and state["rank"] < state["world_size"],
           f"rank {state['rank']} is not below world_size {state['world_size']!r}")
    per_rank = max(1, state["num_workers"])
    _check(state["next_logical"] < per_rank, f"next_logical must be < {per_rank}, got {state['next_logical']}")
    sources = state["sources"]
    _check(isinstance(sources, list) and all(isinstance(s, dict) and isinstance(s.get("filelist"), str)
                                             and _is_count(s.get("parts")) for s in sources),
           "sources must be a list of {filelist: str, parts: int}")
    _check_counts(state["skips_base"], "skips_base")
    _check_counts(state.get("bucket_samples", {}), "bucket_samples")
    geometry = state.get("geometry")  # absent from states saved before it existed: not checked on resume
    _check(geometry is None or (isinstance(geometry, dict) and _is_count(geometry.get("resolution")) and (
        geometry.get("buckets") is None or (isinstance(geometry["buckets"], list) and all(
            isinstance(b, str) for b in geometry["buckets"])))),
        "geometry must be {resolution: int, buckets: null or a list of WxH}")
    if workers:
        _check_workers(state)


def _check_workers(state: dict) -> None:
    workers, per_rank = state["workers"], max(1, state["num_workers"])
    _check(isinstance(workers, list) and len(workers) == per_rank, f"'workers' must list {per_rank} entries")
    for i, w in enumerate(workers):
        if w is not None:
            _check_stream(w, i, len(state["sources"]))


def load_state_file(path: str) -> dict:
    """A saved loader state (checkpoint/loader_state_rank*.json), checked field by field. Unreadable files, bad
    JSON and bad states are a ValueError "<path>: ..." naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not a readable loader state (JSON): {e}") from None
    try:
        check_state(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; delete this file to restart the data stream from its beginning") from None
    return state


def describe_geometry(geometry: Optional[dict]) -> str:
    if not geometry:
        return "an unrecorded resolution"
    if geometry.get("buckets") is None:
        return f"{geometry['resolution']} px square crops"
    return f"buckets {','.join(geometry['buckets'])}"


def geometry_changed(saved: Optional[dict], current: Optional[dict], allow_resolution_change: bool) -> bool:
    """Whether a resume changes the crops (resolution or bucket set); a change without `allow_resolution_change`
    is a ValueError in one line. train.py asks this at start and the loader again when it loads its state."""
    changed = saved is not None and current is not None and saved != current
    if changed and not allow_resolution_change:
        raise ValueError(
            f"the checkpoint's data stream was saved with {describe_geometry(saved)}, this run has "
            f"{describe_geometry(current)}: pass --allow_resolution_change to continue the run at the new "
            "resolution (a resolution stage), or resume with the checkpoint's resolution and buckets")
    return changed


def plan_resume(state: Any, header: dict, allow_resolution_change: bool = False) -> ResumePlan:
    """Validate a saved tracker state against this dataset (`header`: rank, world_size, num_workers, seed,
    sources, geometry) and decide how each logical worker resumes.

    Same layout and seed: exact. Otherwise the streams cannot be mapped one to one, so every source restarts
    at the beginning of the smallest epoch any saved worker was in (no record of that epoch is lost, some
    are seen twice) and a warning says so. A different file list is an error: positions would point at
    other data.

    Another resolution or bucket set (a resolution stage) is an error unless `allow_resolution_change`; with it,
    the streams continue from their saved positions (no record skipped or seen twice) with crops for the new size,
    the records waiting in bucket buffers regrouped into the new buckets, and a warning says what is no longer
    exact. A stage that also changes the file list (each stage its own latent dataset) starts that list from its
    beginning."""
    check_state(state, workers=False)
    saved_geometry, geometry = state.get("geometry"), header.get("geometry")
    changed = geometry_changed(saved_geometry, geometry, allow_resolution_change)
    saved_sources = [(s["filelist"], s["parts"]) for s in state["sources"]]
    current = [(s["filelist"], s["parts"]) for s in header["sources"]]
    per_rank = max(1, header["num_workers"])
    skips, bucket_samples = dict(state["skips_base"]), dict(state.get("bucket_samples", {}))
    if saved_sources != current and changed:
        logger.warning(
            "--allow_resolution_change: %s -> %s with another file list: the data stream starts from the "
            "beginning of %s (weights, EMA, optimizer and schedule continue)", describe_geometry(saved_geometry),
            describe_geometry(geometry), [f for f, _ in current])
        return ResumePlan([None] * per_rank, 0, int(state["batches_consumed"]), {}, False)
    if saved_sources != current:
        raise ValueError(
            "loader state was saved for another file list (filelist, parts): saved "
            f"{saved_sources}, now {current}. Delete the checkpoint's loader_state_rank*.json to restart the "
            "data stream from the beginning.")
    _check_workers(state)
    workers: List[Optional[dict]] = state["workers"]
    same_layout = (state["world_size"], state["num_workers"]) == (header["world_size"], header["num_workers"])
    if same_layout and state["seed"] == header["seed"]:
        _check(state["rank"] == header["rank"],
               f"saved by rank {state['rank']} but loaded by rank {header['rank']}")
        if changed:
            waiting = sum(len(refs) for w in workers if w for _, _, refs in w.get("pending", []))
            logger.warning(
                "--allow_resolution_change: %s -> %s: weights, EMA, optimizer and schedule continue and the data "
                "stream continues from its saved position (no record skipped or repeated), but the batches are "
                "not those of an uninterrupted run at either setting: crops are planned for the new size%s",
                describe_geometry(saved_geometry), describe_geometry(geometry),
                f", and the {waiting} records waiting in bucket buffers are regrouped into the new buckets"
                if waiting else "")
        return ResumePlan(list(workers), int(state["next_logical"]), int(state["batches_consumed"]), skips,
                          not changed, changed, bucket_samples)
    saved = [w for w in workers if w is not None]
    epochs = [min((w["sources"][s]["epoch"] for w in saved), default=0) for s in range(len(current))]
    logger.warning(
        "loader state saved with world_size=%s num_workers=%s seed=%s, resuming with world_size=%s "
        "num_workers=%s seed=%s: the sample order is no longer exact. Every source restarts at the beginning "
        "of its smallest saved epoch %s (records of that epoch already seen will be seen again) and the "
        "shuffle buffers (and bucket buffers) start empty.", state["world_size"], state["num_workers"],
        state["seed"], header["world_size"], header["num_workers"], header["seed"], epochs)
    return ResumePlan([stream_state_at_epochs(epochs) for _ in range(per_rank)], 0,
                      int(state["batches_consumed"]), _sum_counts(skips, workers), False,
                      bucket_samples=bucket_samples)


class LoaderStateTracker:
    """Records what the training loop consumed, so that a checkpoint can resume the data stream exactly."""

    def __init__(self, dataset: Any):
        self._header: dict = dataset.state_header()
        plan: ResumePlan = dataset.resume_plan
        self._workers: List[Optional[dict]] = list(plan.workers)
        self._next = plan.next_logical
        self._batches = plan.batches_consumed
        self._skips_base = dict(plan.skips_base)
        self._bucket_samples: Dict[str, int] = dict(plan.bucket_samples)

    def consume(self, batch: dict) -> dict:
        """Pops "loader_state" from a batch, records it and returns the batch without it. The last batch of a
        failed stream raises LoaderError with its one line."""
        if ERROR_KEY in batch:
            raise LoaderError(str(batch[ERROR_KEY]))
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
        if "bucket" in st:
            n = int(batch["pixel_values"].shape[0])
            self._bucket_samples[st["bucket"]] = self._bucket_samples.get(st["bucket"], 0) + n
        self._workers[logical] = stream
        self._next = (logical + 1) % len(self._workers)
        self._batches += 1
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable; exactly what TextImageDataset.load_state_dict() takes."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._header,
                "batches_consumed": self._batches, "next_logical": self._next,
                "skips_base": dict(self._skips_base), "workers": [w and dict(w) for w in self._workers],
                "bucket_samples": dict(self._bucket_samples)}

    def skip_counts(self) -> Dict[str, int]:
        """Skipped records by reason, summed over this rank's workers, cumulative across resumes."""
        return _sum_counts(self._skips_base, self._workers)

    def bucket_samples(self) -> Dict[str, int]:
        """Samples consumed per aspect-ratio bucket ("WxH"), cumulative across resumes; empty without buckets."""
        return dict(self._bucket_samples)

    @property
    def batches_consumed(self) -> int:
        return self._batches
