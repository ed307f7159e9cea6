"""One worker's batches: records grouped by aspect-ratio bucket, a batch emitted when a bucket holds a full one.

The worker's record stream (sample_stream.WorkerStream: sharding, weighted sources, shuffle buffer, all keyed) is
unchanged; this layer sits after its shuffle buffer. Each record goes to the pending list of its bucket
(buckets.nearest_bucket on its upright header size, read when the record entered the shuffle buffer); when a
bucket holds batch_size records they are decoded, in arrival order, straight into the batch array, and the batch
leaves. Every batch is one bucket's. Square crops are the one-bucket case (R, R): a bucket holds at most
batch_size records, they leave in arrival order, so the batches are exactly those of a plain batch-by-batch
stream (tests/test_loader_resume.py, tests/test_golden_loss.py hold it to that).

Why pending records and not pending pixels: a record is its encoded bytes (tens of kB); its pixels at 512 px are
3 MB, and each bucket can hold batch_size - 1 of them per worker.

Never a hang, never a mixed batch: every bucket holds at most batch_size - 1 records between batches, so among
any K (batch_size - 1) + 1 usable records of the (endless) stream some bucket fills: a batch leaves at least that
often. A rare bucket (one image in a thousand) keeps its records until it fills; the stream never ends (epochs
follow each other), so it does fill, at the latest after batch_size epochs of its records; nothing is dropped and
no batch is padded. Its records are then trained on later than the others: the sample order within an epoch is
not the shuffle buffer's, the set of samples per epoch is unchanged in the long run.

Failures: a record whose pixels fail to decode when its bucket is flushed is counted against its source (the same
limit of failures in a row as everywhere); the records rendered with it are kept, rendered, and the bucket waits
for more. A record is rendered once (its survivors' pixels are kept in memory until their batch leaves), so a
source whose records all fail reaches the limit as it would without buckets.

State: the pending records are references (source, epoch, part, line), per bucket, in arrival order, saved with
the worker's stream state (key "pending") and re-read on resume, so a resumed worker emits exactly the batches of
an uninterrupted one. After a change of the bucket set (--allow_resolution_change) the saved pending records are
regrouped into the new buckets, in their saved order.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.loader.buckets import Bucket
from trainer.loader.sample_stream import Record, Ref, Sample, WorkerStream, read_refs

PendingState = List[list]  # [[width, height, [[source, epoch, part, line], ...]], ...]


class BucketBatcher:
    """Full one-bucket batches from one worker's record stream; `state()` after any batch restores to it."""

    def __init__(self, stream: WorkerStream, buckets: Sequence[Bucket], batch_size: int,
                 pending: PendingState = (), regroup: bool = False):
        if batch_size < 1 or not buckets:
            raise ValueError(f"BucketBatcher needs batch_size >= 1 and buckets, got {batch_size}, {buckets}")
        self.stream, self.buckets, self.batch_size = stream, tuple(buckets), batch_size
        self.pending: Dict[Bucket, List[Record]] = {b: [] for b in self.buckets}
        self._rendered: Dict[Ref, Sample] = {}  # survivors of a flush that lost a record: rendered once
        saved = [((int(w), int(h)), [tuple(r) for r in refs]) for w, h, refs in pending]
        refs = [r for _, rs in saved for r in rs]
        records = read_refs(stream.sources, refs, stream.cfg.data.max_line_bytes) if refs else {}
        for bucket, rs in saved:
            for ref in rs:
                rec = records[ref]
                target = bucket if bucket in self.pending and not regroup else self._bucket_of(rec)
                if target is not None:
                    self.pending[target].append(rec)

    def state(self) -> dict:
        """The worker stream's state plus the pending records (references), per bucket, in arrival order."""
        return {**self.stream.state(),
                "pending": [[b[0], b[1], [list(r.ref) for r in recs]] for b, recs in self.pending.items() if recs]}

    def pending_counts(self) -> Dict[Bucket, int]:
        return {b: len(recs) for b, recs in self.pending.items()}

    def _bucket_of(self, rec: Record) -> Optional[Bucket]:
        if len(self.buckets) == 1:  # square crops: no header to read
            return self.buckets[0]
        return self.stream.bucket_of(rec, self.buckets)

    def next_batch(self) -> Tuple[Bucket, np.ndarray, List[Sample]]:
        """(bucket, pixels float32 [B, 3, height, width], the B samples). Raises LoaderError when a source fails
        too many records in a row."""
        while True:
            # Only a regrouped resume can leave several full buckets: the first in list order goes first.
            full = next((b for b in self.buckets if len(self.pending[b]) >= self.batch_size), None)
            if full is not None:
                got = self._flush(full)
                if got is not None:
                    return got
                continue
            rec = self.stream.next_record()
            bucket = self._bucket_of(rec)
            if bucket is not None:
                self.pending[bucket].append(rec)

    def _flush(self, bucket: Bucket) -> Optional[Tuple[Bucket, np.ndarray, List[Sample]]]:
        """The batch of the first batch_size pending records of `bucket`; None (the survivors kept, rendered)
        when some fail."""
        w, h = bucket
        # A fresh array per batch (the consumer keeps the previous one); samples decode straight into it.
        pixels = np.empty((self.batch_size, 3, h, w), dtype=np.float32)
        samples: List[Sample] = []
        failed = set()
        for rec in self.pending[bucket][:self.batch_size]:
            out = pixels[len(samples)]
            sample = self._rendered.pop(rec.ref, None)
            if sample is not None:
                out[...] = sample.pixel_values
                sample = dataclasses.replace(sample, pixel_values=out)
            else:
                sample = self.stream.render(rec, out, bucket)
            if sample is None:
                failed.add(rec.ref)
            else:
                samples.append(sample)
        if not failed:
            del self.pending[bucket][:self.batch_size]
            return bucket, pixels, samples
        for s in samples:
            self._rendered[s.ref] = dataclasses.replace(s, pixel_values=s.pixel_values.copy())
        self.pending[bucket] = [r for r in self.pending[bucket] if r.ref not in failed]
        return None
