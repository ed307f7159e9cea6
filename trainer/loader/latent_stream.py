"""One logical worker's stream of a latent dataset (precompute_latents.py's shards, data_tools/latent_format.py).

The twin of sample_stream.py for cached VAE moments: the same sharding (sharding.py: a worker's stride of the
epoch's shuffled shard order, or by record when there are fewer shards than global readers, the record's source
line deciding who keeps it, as for image parts), the same weighted source choice, shuffle buffer and emission
rule, and the same state (cursors, counters, buffer of (source, epoch, shard, record) references), so
loader_state.py saves and resumes it unchanged. A shard lists the same part positions as the image filelist it
was made from, and each record keeps its source line, so on clean data the records a worker reads, their order
and their keyed per-sample draws (caption dropout) are those of the image stream.

Per-sample randomness: the image loader's generator keyed (seed, TAG_SAMPLE, source, epoch, part, line); its first
draw decides caption dropout (a dropped caption takes the shard's cached "" ids or embedding). The flip is that
generator's next uniform draw (< 0.5: the mirrored moments); the image path draws its crop offsets first, whose
number depends on the image's size, which a shard does not hold, so with --random_flip the flips differ from the
image path's (their law is the same).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.latent_format import LatentShard, latent_manifest_of
from data_tools.filelists import list_lines, listed_candidates, parse_weighted_line
from trainer.loader.sample_stream import (TAG_SAMPLE, CursorPosition, LoaderError, Ref, SkipCounter,
                                          SourceSpec, StreamConfig, emit, failure_line, fresh_cursor_state)
from trainer.loader.sharding import WorkerLayout, choose_source, keeps_line, worker_parts

OPEN_SHARDS = 16  # open shard files kept per worker (the buffer references records of recent shards)


@dataclass
class LatentSample:
    """One emitted sample of cached latents (float32 arrays), with the metadata inspect_data.py writes."""

    mean: np.ndarray  # [C, h, w], unscaled posterior mean (mirrored when flipped)
    std: np.ndarray
    text: Optional[np.ndarray]  # [L, D] cached encoder output (the empty caption's when dropped), or None
    input_ids: np.ndarray  # [L] int64 (the empty caption's when dropped)
    caption: str  # after caption dropout ("" when dropped)
    raw_caption: str
    flipped: bool
    ref: Ref  # (source, epoch, shard index, record index in the shard)
    part_path: str  # the shard
    source_line: int  # the record's 0-based line in the image part it was encoded from


@dataclass(frozen=True)
class OpenShard:
    shard: LatentShard
    record_ids: np.ndarray  # [N, 3] (source, part, line) of every record: read once, sharding reads its lines
    empty_input_ids: np.ndarray  # what a dropped caption trains with
    empty_text: Optional[np.ndarray]


class ShardCache:
    """Open shards of one worker, least recently used closed first."""

    def __init__(self, size: int = OPEN_SHARDS):
        self.size = size
        self._open: "OrderedDict[str, OpenShard]" = OrderedDict()

    def get(self, path: str) -> OpenShard:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        shard = LatentShard(path)
        ids = shard.read("record_id") if shard.num_records else np.zeros((0, 3), np.int64)
        entry = OpenShard(shard, ids, shard.empty_input_ids(), shard.empty_text())
        self._open[path] = entry
        while len(self._open) > self.size:
            self._open.popitem(last=False)[1].shard.close()
        return entry


class LatentCursor(CursorPosition):
    """Reads one latent source's records for one global worker, looping over epochs forever. `line` in its state
    is the next record index within the current shard."""

    FAILED = "shards or records in a row failed"
    NO_RECORD, UNITS = "no record", "shards"

    def __init__(self, index: int, spec: SourceSpec, layout: WorkerLayout, global_worker: int, seed: int,
                 shards: ShardCache, skips: SkipCounter, max_bad: int, state: Dict[str, int]):
        self._start(index, spec, layout, global_worker, seed, skips, max_bad, state)
        self.shards = shards

    def next_ref(self) -> Ref:
        while True:
            if self._order_epoch != self.epoch:
                self._order = worker_parts(len(self.spec.parts), self.seed, self.index, self.epoch, self.g, self.G)
                self._order_epoch = self.epoch
            if self.pos >= len(self._order):
                self._end_epoch()
                continue
            part = self._order[self.pos]
            path = self.spec.parts[part]
            try:
                opened = self.shards.get(path)
            except Exception as e:  # noqa: BLE001 - safetensors' own error too: an unreadable shard is skipped
                self.pos, self.line = self.pos + 1, 0
                self.failed("bad_shard", f"{path}: {e}"[:1000])
                continue
            shard, ids = opened.shard, opened.record_ids
            while self.line < shard.num_records:
                k = self.line
                self.line += 1
                if keeps_line(self.mode, int(ids[k, 2]), self.pos, self.epoch, self.g, self.G):
                    self.hits += 1
                    return (self.index, self.epoch, part, k)
            self.pos, self.line = self.pos + 1, 0


class LatentWorkerStream:
    """The latent sample stream of one logical worker; `state()` has sample_stream.WorkerStream's shape."""

    def __init__(self, sources: Sequence[SourceSpec], layout: WorkerLayout, logical_worker: int,
                 cfg: StreamConfig, state: Optional[dict] = None):
        self.sources, self.cfg = list(sources), cfg
        self.g = layout.global_id(logical_worker)
        weights = np.array([s.weight if s.parts else 0.0 for s in self.sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights)
        st = state or {"sources": [fresh_cursor_state() for _ in self.sources], "inserted": 0, "emitted": 0,
                       "buffer": [], "skips": {}}
        self.skips = SkipCounter(f"{cfg.skips_where} worker {self.g}", st["skips"])
        self.shards = ShardCache()
        self.cursors = [LatentCursor(i, spec, layout, self.g, cfg.seed, self.shards, self.skips,
                                     cfg.data.max_consecutive_skips, cs)
                        for i, (spec, cs) in enumerate(zip(self.sources, st["sources"]))]
        self.inserted, self.emitted = st["inserted"], st["emitted"]
        self.buffer: List[Ref] = [tuple(r) for r in st["buffer"]]
        for s, _, p, k in self.buffer:  # a resumed buffer must still point at records
            if not (0 <= s < len(self.sources) and 0 <= p < len(self.sources[s].parts)):
                raise ValueError(f"loader state references source {s} shard {p}, which the file list does not have")
            shard = self.shards.get(self.sources[s].parts[p]).shard
            if k >= shard.num_records:
                raise LoaderError(failure_line(
                    "resume", f"{shard.path} has no record {k} (it has {shard.num_records})", {},
                    "The shard changed since the checkpoint: restore it, or delete the checkpoint's "
                    "loader_state_rank*.json to restart the data stream from its beginning."))

    def state(self) -> dict:
        return {"sources": [c.state() for c in self.cursors], "inserted": self.inserted,
                "emitted": self.emitted, "buffer": [list(r) for r in self.buffer],
                "skips": dict(self.skips.counts)}

    def _insert(self) -> Ref:
        s = choose_source(self.cum_weights, self.cfg.seed, self.g, self.inserted)
        self.inserted += 1
        return self.cursors[s].next_ref()

    def _next_ref(self) -> Ref:
        ref, self.emitted = emit(self.buffer, self._insert, self.emitted, self.cfg, self.g)  # the image stream's rule
        return ref

    def next_sample(self) -> LatentSample:
        while True:
            ref = self._next_ref()
            s, epoch, part, k = ref
            path = self.sources[s].parts[part]
            try:
                opened = self.shards.get(path)
                rec = opened.shard.record(k)
            except Exception as e:  # noqa: BLE001 - any failure reading one record is that record's skip
                self.cursors[s].failed("bad_latent_record", f"{path}: record {k}: {e}"[:1000])
                continue
            line = int(opened.record_ids[k, 2])
            rng = np.random.default_rng([self.cfg.seed, TAG_SAMPLE, s, epoch, part, line])
            dropped = rng.random() < self.cfg.data.caption_dropout_prob
            flipped = bool(self.cfg.data.random_flip and rng.random() < 0.5)
            if flipped and rec.mean_flip is None:
                self.cursors[s].failed("no_flip_moments", f"{path}: --random_flip but the shard has no mean_flip")
                continue
            self.cursors[s].bad = 0
            return LatentSample(
                rec.mean_flip if flipped else rec.mean, rec.std_flip if flipped else rec.std,
                opened.empty_text if dropped else rec.text, opened.empty_input_ids if dropped else rec.input_ids,
                "" if dropped else rec.caption, rec.caption, flipped, ref, path, line)


def refuse_buckets(data) -> None:
    """A latent dataset's records are square crops of its manifest's resolution: --aspect_ratio_buckets needs image
    parts (checked at start by sd/args.py check_latents, and by the dataset for every other user)."""
    if data.aspect_ratio_buckets is not None:
        raise ValueError(f"--aspect_ratio_buckets {data.aspect_ratio_buckets}: --file_list {data.file_list} is a "
                         "latent dataset, whose records are square crops of one resolution; train with buckets "
                         "from image parts (or drop the flag)")


def listed_latent_manifests(file_list: str) -> List[Tuple[str, Optional[dict]]]:
    """(filelist, latent_manifests()'s entry) of the filelists a .filelist.list names that exist, without reading their parts: what
    resolve_train checks at start. A filelist that does not exist is left to the loader, which names it when the
    stream is built (tests/test_args.py resolves runs whose lists name no real data)."""
    found = []
    for _, text in list_lines(file_list, "--file_list"):  # the list's own line and lookup rules (filelists)
        found += [c for c, _ in listed_candidates(parse_weighted_line(text)[0], file_list) if os.path.isfile(c)][:1]
    return list(zip(found, latent_manifests(file_list, found)))


def latent_manifests(file_list: str, filelists: List[str]) -> List[Optional[dict]]:
    """Each filelist's latent manifest (None: image parts). A list mixing the two is an error naming both."""
    manifests = [latent_manifest_of(f) for f in filelists]
    kinds = {m is not None for m in manifests}
    if len(kinds) > 1:
        lat = next(f for f, m in zip(filelists, manifests) if m is not None)
        img = next(f for f, m in zip(filelists, manifests) if m is None)
        raise ValueError(f"--file_list {file_list} mixes a latent dataset ({lat}) with image parts ({img}): train "
                         "from one kind (precompute_latents.py the image sources too, or list images only)")
    return manifests
