"""One logical worker's infinite, deterministic, resumable sample stream.

A stream is: per source a cursor (epoch, position in the worker's part order, next line, plus the counters
that decide when a part or source is given up), a weighted source choice per insertion, and a shuffle
buffer. All randomness is counter-based (sharding.py), so the whole state is a few integers plus the
buffer's contents as references (source, epoch, part index, line) that a restore re-reads from the parts.

Failures: every failure of one record, at any stage (reading the part, an over-long line, parsing, base64, the
image header, decoding, the transform), is a skip counted by reason. Each source also counts its failures in a
row, across stages and parts, reset only when one of its records becomes a sample: at --max_consecutive_skips
the stream raises LoaderError, whose message is the one line the run ends with (what failed, the counts by reason,
what to do). So a source of truncated images whose headers parse ends the run instead of being scanned forever.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from data_tools.part_format import RecordError, iter_part_lines, parse_record
from trainer.loader.buckets import nearest_bucket
from trainer.loader.sharding import (WorkerLayout, buffer_pick, choose_source, keeps_line, sharding_mode,
                                     worker_parts)
from trainer.loader.transforms import ImageTransform

if TYPE_CHECKING:
    from trainer.loader.config import DataArguments

logger = logging.getLogger("trainer.loader")

TAG_SAMPLE = 4  # sharding.py's tags are 1-3
# N bad records in a row end that part for the epoch, with a warning naming it: a part that is garbage from
# some line on (a bad dump, a wrong format) costs 50 parse attempts, not its whole length. Not a flag: no
# dataset has needed another value.
MAX_CONSECUTIVE_FAILURES = 50
Ref = Tuple[int, int, int, int]  # (source, epoch, part index, line number)


@dataclass(frozen=True)
class SourceSpec:
    """A source as the stream sees it: parts resolved, format decided, weight."""

    filelist: str
    weight: float
    parts: Tuple[str, ...]
    data_format: str


@dataclass
class Record:
    ref: Ref
    caption: str
    image: bytes
    part_path: str
    header: Optional[Image.Image] = None  # opened and checked at insertion (records re-read on resume: None)


@dataclass
class Sample:
    """One emitted sample, with the metadata inspect_data.py writes."""

    pixel_values: np.ndarray  # float32 [3, R, R] ([3, height, width] in an aspect-ratio bucket)
    caption: str  # after caption dropout ("" when dropped)
    raw_caption: str
    ref: Ref
    part_path: str
    bucket: Optional[Tuple[int, int]] = None  # (width, height) of its aspect-ratio bucket; None: square crops


class LoaderError(RuntimeError):
    """A failure of the data stream itself (not of one record). Its message is one line: what failed, the skip
    counts by reason, and what to do."""


def failure_line(where: str, problem: str, counts: Mapping[str, int], advice: str) -> str:
    by_reason = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    return f"data loader ({where}): {problem}; skipped so far: {by_reason}. {advice}"


SOURCE_ADVICE = ("Look at it with data_tools/inspect_data.py, then fix or remove that filelist from --file_list "
                 "(or raise --max_consecutive_skips if the records are usable but rare).")


class SkipCounter:
    """Counts skipped records by reason and logs them, rate-limited: the first few of each reason, then at
    every power of ten, so a bad dataset is visible without flooding the log."""

    FIRST = 5

    def __init__(self, where: str, counts: Optional[Dict[str, int]] = None):
        self.where = where
        self.counts: Counter = Counter(counts or {})

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.FIRST or str(n).rstrip("0") == "1":  # the first few, then 10, 100, 1000, ...
            logger.warning("%s: skipped record (%s, %d so far): %s", self.where, reason, n, detail)


def fresh_cursor_state(epoch: int = 0) -> Dict[str, int]:
    return {"epoch": epoch, "pos": 0, "line": 0, "fails": 0, "hits": 0, "empty": 0, "bad": 0}


def emit(buffer: list, insert: Callable[[], Any], emitted: int, cfg: "StreamConfig", global_worker: int):
    """(the next emission, the new emission count) of a worker's shuffle buffer, the same rule for image records
    and latent references: every shuffle_every_n_samples-th emission is a uniform keyed pick from the buffer,
    whose slot the next insertion takes; between them items pass straight through (the reference's
    shuffle_every_n_samples; with 1, the default, every emission is a pick)."""
    while len(buffer) < cfg.data.buffer_size:
        buffer.append(insert())
    if emitted % cfg.data.shuffle_every_n_samples:
        return insert(), emitted + 1
    i = buffer_pick(len(buffer), cfg.seed, global_worker, emitted)
    item, buffer[i] = buffer[i], insert()
    return item, emitted + 1


class CursorPosition:
    """What every source cursor shares (image parts here, latent shards in latent_stream.py): the resumable
    position of one source for one global worker, and the limit on failures in a row."""

    FAILED = "records in a row failed with no usable sample between"  # how failure_line words the limit
    NO_RECORD, UNITS = "no usable record", "parts"  # how failure_line words an epoch with nothing usable

    def _start(self, index: int, spec: SourceSpec, layout: WorkerLayout, global_worker: int, seed: int,
               skips: SkipCounter, max_bad: int, state: Dict[str, int]) -> None:
        self.index, self.spec, self.seed, self.skips, self.max_bad = index, spec, seed, skips, max_bad
        self.g, self.G = global_worker, layout.global_workers
        self.mode = sharding_mode(len(spec.parts), self.G)
        # A source with no usable record for this many consecutive epochs of this worker is an error rather
        # than an endless scan. Generous: in part mode a lone good part reaches a given worker in an epoch
        # with probability ~1/G, so (1 - 1/G)^(10G + 10) < 5e-5 of a false alarm.
        self.max_empty_epochs = 10 * self.G + 10
        self.epoch, self.pos, self.line = state["epoch"], state["pos"], state["line"]
        self.fails, self.hits, self.empty = state["fails"], state["hits"], state["empty"]
        self.bad = state.get("bad", 0)  # absent from states saved before it existed
        self._order_epoch = -1
        self._order: List[int] = []

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "line": self.line, "fails": self.fails,
                "hits": self.hits, "empty": self.empty, "bad": self.bad}

    def _end_epoch(self) -> None:
        self.empty = self.empty + 1 if self.hits == 0 else 0
        if self.empty >= self.max_empty_epochs:
            raise LoaderError(failure_line(
                self.skips.where, f"source {self.spec.filelist}: {self.NO_RECORD} for global worker {self.g}/"
                f"{self.G} in {self.empty} consecutive epochs ({self.mode} sharding, {len(self.spec.parts)} "
                f"{self.UNITS})", self.skips.counts, SOURCE_ADVICE))
        self.epoch, self.pos, self.line, self.fails, self.hits = self.epoch + 1, 0, 0, 0, 0

    def failed(self, reason: str, detail: str) -> None:
        """Count a failure of one of this source's records (any stage); the limit in a row is a LoaderError."""
        self.skips.add(reason, detail)
        self.bad += 1
        if self.bad >= self.max_bad:
            raise LoaderError(failure_line(
                self.skips.where, f"source {self.spec.filelist}: {self.bad} {self.FAILED} (the last: {reason}: "
                f"{detail[:300]})", self.skips.counts, SOURCE_ADVICE))


class SourceCursor(CursorPosition):
    """Reads one source's records for one global worker, looping over epochs forever. Its limits (line cap,
    failures in a row) are the loader's DataArguments, read through the transform that shares them."""

    def __init__(self, index: int, spec: SourceSpec, layout: WorkerLayout, global_worker: int, seed: int,
                 transform: ImageTransform, skips: SkipCounter, max_consecutive_failures: int,
                 state: Dict[str, int]):
        self._start(index, spec, layout, global_worker, seed, skips, transform.data.max_consecutive_skips, state)
        self.transform = transform
        self.max_fails = max_consecutive_failures
        self.max_line_bytes = transform.data.max_line_bytes
        self._it = None
        self._path = ""
        self._part_idx = -1

    def _parts_this_epoch(self) -> List[int]:
        if self._order_epoch != self.epoch:
            self._order = worker_parts(len(self.spec.parts), self.seed, self.index, self.epoch, self.g, self.G)
            self._order_epoch = self.epoch
        return self._order

    def _next_part(self) -> None:
        if self._it is not None:
            self._it.close()
        self._it = None
        self.pos, self.line, self.fails = self.pos + 1, 0, 0

    def _bad_line(self, reason: str, detail: str, line_no: int) -> None:
        self.fails += 1
        self.failed(reason, detail)
        if self.fails >= self.max_fails:
            self.skips.add("part_abandoned", f"{self._path}: {self.fails} consecutive bad records up "
                           f"to line {line_no + 1}; giving up on this part for epoch {self.epoch}")
            self._next_part()

    def next_record(self) -> Record:
        while True:
            if self._it is None:
                parts = self._parts_this_epoch()
                if self.pos >= len(parts):
                    self._end_epoch()
                    continue
                self._part_idx = parts[self.pos]
                self._path = self.spec.parts[self._part_idx]
                self._it = iter_part_lines(self._path, self.line, self.max_line_bytes)
            try:
                item = next(self._it, None)
            except RecordError as e:  # unreadable or corrupt part: the lines before the damage were read
                self._next_part()
                self.failed(e.reason, e.detail)
                continue
            if item is None:
                self._next_part()
                continue
            line_no, raw = item
            self.line = line_no + 1
            if not keeps_line(self.mode, line_no, self.pos, self.epoch, self.g, self.G):
                continue
            where = f"{self._path}:{line_no + 1}"
            if raw is None:
                self._bad_line("line_too_long", f"{where}: longer than max_line_bytes {self.max_line_bytes}",
                               line_no)
                continue
            try:
                caption, image = parse_record(raw, self.spec.data_format)
                header = self.transform.open_checked(image)
            except RecordError as e:
                self._bad_line(e.reason, f"{where}: {e.detail}", line_no)
                continue
            except Exception as e:  # noqa: BLE001 - any failure on one record's bytes is that record's skip
                self._bad_line("bad_record", f"{where}: {e!r}"[:1000], line_no)
                continue
            self.fails = 0
            self.hits += 1
            return Record((self.index, self.epoch, self._part_idx, line_no), caption, image, self._path, header)


def read_refs(sources: Sequence[SourceSpec], refs: Sequence[Ref], max_line_bytes: Optional[int] = None
              ) -> Dict[Ref, Record]:
    """Re-read the records behind shuffle-buffer references, scanning each part involved once. A reference that
    no longer leads to the record it was (the part changed, shrank or went away) is a LoaderError."""
    by_part: Dict[Tuple[int, int], Dict[int, List[Ref]]] = {}
    for ref in refs:
        s, _, p, ln = ref
        if not (0 <= s < len(sources) and 0 <= p < len(sources[s].parts)):
            raise ValueError(f"loader state references source {s} part {p}, which the file list does not have")
        by_part.setdefault((s, p), {}).setdefault(ln, []).append(ref)
    out: Dict[Ref, Record] = {}
    advice = ("The part changed since the checkpoint: restore it, or delete the checkpoint's "
              "loader_state_rank*.json to restart the data stream from its beginning.")
    for (s, p), lines in by_part.items():
        path, last = sources[s].parts[p], max(lines)
        try:
            for line_no, raw in iter_part_lines(path, min(lines), max_line_bytes):
                if line_no in lines and raw is not None:
                    caption, image = parse_record(raw, sources[s].data_format)
                    out.update((ref, Record(ref, caption, image, path)) for ref in lines[line_no])
                if line_no >= last:
                    break
        except RecordError as e:
            raise LoaderError(failure_line("resume", f"cannot re-read the shuffle buffer from {path}: {e}", {},
                                           advice)) from None
        missing = [ln for ln in lines if lines[ln][0] not in out]
        if missing:
            raise LoaderError(failure_line(
                "resume", f"cannot re-read the shuffle buffer: {path} has no record at line(s) "
                f"{sorted(ln + 1 for ln in missing)[:5]}", {}, advice))
    return out


@dataclass(frozen=True)
class StreamConfig:
    """What a stream reads: the loader's DataArguments (buffer_size, shuffle_every_n_samples,
    caption_dropout_prob and the limits), the training seed, and where its skip warnings say they come from."""

    data: "DataArguments"
    seed: int
    skips_where: str = "loader"
    max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES


class WorkerStream:
    """The sample stream of one logical worker. `state()` after any emission restores to the same point."""

    def __init__(self, sources: Sequence[SourceSpec], layout: WorkerLayout, logical_worker: int,
                 transform: ImageTransform, cfg: StreamConfig, state: Optional[dict] = None):
        self.sources, self.cfg, self.transform = list(sources), cfg, transform
        self.logical = logical_worker
        self.g = layout.global_id(logical_worker)
        weights = np.array([s.weight if s.parts else 0.0 for s in self.sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights)
        st = state or {"sources": [fresh_cursor_state() for _ in self.sources], "inserted": 0, "emitted": 0,
                       "buffer": [], "skips": {}}
        self.skips = SkipCounter(f"{cfg.skips_where} worker {self.g}", st["skips"])
        self.cursors = [SourceCursor(i, spec, layout, self.g, cfg.seed, transform, self.skips,
                                     cfg.max_consecutive_failures, cs)
                        for i, (spec, cs) in enumerate(zip(self.sources, st["sources"]))]
        self.inserted, self.emitted = st["inserted"], st["emitted"]
        refs = [tuple(r) for r in st["buffer"]]
        records = read_refs(self.sources, refs, cfg.data.max_line_bytes) if refs else {}
        self.buffer: List[Record] = [records[r] for r in refs]

    def state(self) -> dict:
        return {"sources": [c.state() for c in self.cursors], "inserted": self.inserted,
                "emitted": self.emitted, "buffer": [list(r.ref) for r in self.buffer],
                "skips": dict(self.skips.counts)}

    def _insert(self) -> Record:
        s = choose_source(self.cum_weights, self.cfg.seed, self.g, self.inserted)
        self.inserted += 1
        return self.cursors[s].next_record()

    def next_record(self) -> Record:
        """The next record out of the shuffle buffer, not yet decoded (bucket_stream.py groups these)."""
        rec, self.emitted = emit(self.buffer, self._insert, self.emitted, self.cfg, self.g)
        return rec

    def next_sample(self, out: Optional[np.ndarray] = None) -> Sample:
        """The next sample; its pixels are written into `out` ([3, R, R] float32) when given. Raises LoaderError
        when a source fails too many records in a row."""
        while True:
            sample = self.render(self.next_record(), out)
            if sample is not None:
                return sample

    def render(self, rec: Record, out: Optional[np.ndarray] = None, bucket: Optional[Tuple[int, int]] = None
               ) -> Optional[Sample]:
        """The sample of one record (its crop in `bucket` when given), pixels written into `out` when given; None
        when the record fails, counted against its source (LoaderError at the limit of failures in a row)."""
        s, epoch, part, line = rec.ref
        # Per-record randomness keyed by the record and its epoch: the same augmentation whichever
        # worker reads it, and nothing to save.
        rng = np.random.default_rng([self.cfg.seed, TAG_SAMPLE, s, epoch, part, line])
        dropped = rng.random() < self.cfg.data.caption_dropout_prob
        try:
            img = rec.header if rec.header is not None else self.transform.open_checked(rec.image)
            pixels = self.transform.apply(img, rng, out, bucket)
        except RecordError as e:  # the header was fine at insertion, the pixel data is not
            self.cursors[s].failed(e.reason, f"{rec.part_path}:{line + 1}: {e.detail}")
            return None
        except Exception as e:  # noqa: BLE001 - counted like any stage; a bug fails every record: the limit
            self.cursors[s].failed("transform_error", f"{rec.part_path}:{line + 1}: {e!r}"[:1000])
            return None
        self.cursors[s].bad = 0
        return Sample(pixels, "" if dropped else rec.caption, rec.caption, rec.ref, rec.part_path, bucket)

    def bucket_of(self, rec: Record, buckets: Sequence[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
        """The aspect-ratio bucket of a record, from its header (opened and kept when the record was re-read on
        resume); None when the record fails there, counted against its source."""
        s, _, _, line = rec.ref
        try:
            if rec.header is None:
                rec.header = self.transform.open_checked(rec.image)
            return nearest_bucket(*self.transform.upright_size(rec.header), buckets)
        except RecordError as e:
            self.cursors[s].failed(e.reason, f"{rec.part_path}:{line + 1}: {e.detail}")
            return None
