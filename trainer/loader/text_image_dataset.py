"""Streaming text-image dataset for Stable Diffusion pretraining: weighted sources of laion-format parts (or of a
latent dataset's shards, precompute_latents.py), sharded over ranks x DataLoader workers, deterministic, exactly
resumable, robust to bad records.

A file list whose filelists have a "sd_latents" manifest (data_tools/latent_format.py) streams cached VAE moments
through latent_stream.py, with the same sharding, weights, state and error path; a list mixing latent datasets
and image parts is a start error.

Pieces: config.py (DataArguments: the data section of the training arguments, the only configuration),
sharding.py (who reads what), transforms.py (image -> tensor), sample_stream.py (one worker's stream),
buckets.py and bucket_stream.py (aspect-ratio buckets; square crops are the one-bucket case), loader_state.py
(checkpoint state and its tracker). This module wires them behind the interface the Trainer
uses (the seed and the tokenizer's length come from the training and model arguments, not from DataArguments):

    ds = TextImageDataset(data_args, tokenizer, per_device_batch, rank, world_size, num_workers,
                          seed=training_args.seed, model_max_length=model_args.model_max_length)
    ds.load_state_dict(saved)            # optional, before build_dataloader()
    dl = build_dataloader(ds)
    tracker = LoaderStateTracker(ds)
    for batch in dl: batch = tracker.consume(batch) ...

Nothing hangs: a failure inside the stream (LoaderError, or any exception of the loader's own) never escapes
__iter__, where it would end paddle's reader thread (num_workers=0) and leave the main thread waiting forever.
It becomes a last batch {"loader_error": one line}, after which the stream ends; LoaderStateTracker.consume
raises LoaderError with that line in the training process, whatever the worker count.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import paddle

from data_tools.filelists import data_format_of, read_filelist_list
from trainer.loader.config import DataArguments
from trainer.loader.latent_stream import LatentWorkerStream, latent_manifests, refuse_buckets
from trainer.loader.loader_state import (ERROR_KEY, LoaderStateTracker, ResumePlan, batch_state, fresh_plan,
                                        load_state_file, plan_resume)
from trainer.loader.bucket_stream import BucketBatcher
from trainer.loader.buckets import bucket_name
from trainer.loader.sample_stream import LoaderError, Sample, SourceSpec, StreamConfig, WorkerStream, failure_line
from trainer.loader.sharding import WorkerLayout, sharding_mode
from trainer.loader.resample import single_thread_blas
from trainer.loader.transforms import ImageTransform

__all__ = ["TextImageDataset", "build_dataloader", "LoaderStateTracker", "LoaderError", "Sample", "load_state_file"]

logger = logging.getLogger("trainer.loader")


class TextImageDataset(paddle.io.IterableDataset):
    """Yields complete batches: {"pixel_values": float32 [B,3,R,R] in [-1,1] (with --aspect_ratio_buckets
    [B,3,H,W], every sample of a batch from the same bucket), "input_ids": int64 [B,L] (absent when tokenizer is
    None), "loader_state": JSON str}; from a latent dataset, _latent_batches' keys."""

    def __init__(self, data: DataArguments, tokenizer: Any, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, *, seed: int,
                 model_max_length: Optional[int] = None):
        """`seed` is the training seed (it keys every random choice); `model_max_length` the tokenizer's
        padding length, needed only with a tokenizer."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it keys numpy SeedSequences), got {seed}")
        if tokenizer is not None and (model_max_length is None or model_max_length < 2):
            raise ValueError(f"model_max_length must be >= 2 with a tokenizer, got {model_max_length}")
        self.data, self.tokenizer, self.batch_size = data, tokenizer, batch_size
        self.seed, self.model_max_length, self.num_workers = seed, model_max_length, num_workers
        self.layout = WorkerLayout(rank, world_size, num_workers)
        self.text_embeddings = False
        # Validates the file list now, naming any missing filelist or part, rather than in a worker later.
        listed = read_filelist_list(data.file_list)
        self.latent_manifests = latent_manifests(data.file_list, [src.filelist for src in listed])
        self.latents = bool(listed) and self.latent_manifests[0] is not None
        # A latent filelist's format is its manifest's "sd_latents"; --data_format names image formats only.
        self.sources = [SourceSpec(src.filelist, src.weight, src.parts, data_format_of(src.filelist, data.data_format))
                        for src in listed]
        self.bases = [(src.base, src.parts_base) for src in listed]
        for notice in data.notices():
            logger.warning("%s", notice)
        self.transform = ImageTransform(data)
        if self.latents:  # cached text embeddings: every source must have them, or none
            kinds = {bool(m["dependencies"]["text_embeddings"]) for m in self.latent_manifests}
            if len(kinds) > 1:
                raise ValueError(f"--file_list {data.file_list}: some latent datasets hold text embeddings and "
                                 "some do not: precompute them alike")
            self.text_embeddings = kinds.pop()
            refuse_buckets(data)
        # Square crops are the one bucket (R, R): one batching path (bucket_stream.py) for both.
        self.buckets = data.buckets() or ((data.resolution, data.resolution),)
        self.resume_plan: ResumePlan = fresh_plan(self.layout.workers_per_rank)

    # ------------------------------------------------------------------------------------------ state
    def state_header(self) -> dict:
        return {"rank": self.layout.rank, "world_size": self.layout.world_size,
                "num_workers": self.num_workers, "seed": self.seed,
                "sources": [{"filelist": s.filelist, "parts": len(s.parts)} for s in self.sources],
                "geometry": self.data.geometry()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from LoaderStateTracker.state_dict(). Call before build_dataloader(). A state saved at another
        resolution or bucket set needs --allow_resolution_change (loader_state.plan_resume)."""
        self.resume_plan = plan_resume(state, self.state_header(), self.data.allow_resolution_change)

    def describe(self) -> str:
        srcs = ", ".join(
            f"{s.filelist} (w={s.weight:g}, {s.data_format}, {len(s.parts)} parts, by "
            f"{sharding_mode(len(s.parts), self.layout.global_workers) if s.parts else 'none: empty'}; "
            f"found by {base}, parts by {parts_base})"
            for s, (base, parts_base) in zip(self.sources, self.bases))
        lay = self.layout
        crops = (f"{self.data.resolution}px" if self.data.aspect_ratio_buckets is None else
                 f"{len(self.buckets)} aspect-ratio buckets {' '.join(bucket_name(b) for b in self.buckets)}")
        return (f"{len(self.sources)} source(s): {srcs}; {lay.global_workers} global workers "
                f"(world {lay.world_size} x {lay.workers_per_rank} per rank), rank {lay.rank}, "
                f"batch {self.batch_size}, {crops}, seed {self.seed}")

    # ------------------------------------------------------------------------------------------ streams
    def _logical_worker(self) -> int:
        """Which logical worker this process plays: physical worker p plays (p + next_logical) % W, so
        that paddle's round-robin from worker 0 continues the saved rotation."""
        info = paddle.io.get_worker_info()
        physical = 0 if info is None else info.id
        if info is not None and info.num_workers != self.layout.workers_per_rank:
            raise RuntimeError(f"DataLoader runs {info.num_workers} workers but the dataset was built for "
                               f"num_workers={self.num_workers}")
        return (physical + self.resume_plan.next_logical) % self.layout.workers_per_rank

    def open_stream(self, logical_worker: int):
        """The logical worker's stream: a WorkerStream of images, or a LatentWorkerStream of a latent dataset."""
        scfg = StreamConfig(self.data, self.seed, f"rank {self.layout.rank}")
        if self.latents:
            return LatentWorkerStream(self.sources, self.layout, logical_worker, scfg,
                                      self.resume_plan.workers[logical_worker])
        return WorkerStream(self.sources, self.layout, logical_worker, self.transform, scfg,
                            self.resume_plan.workers[logical_worker])

    def iter_samples(self, logical_worker: Optional[int] = None) -> Iterator[Sample]:
        """Single samples with their metadata (caption, source, part, line, bucket), in the order of the batches
        the worker would emit (of this dataset's batch size): used by data_tools/inspect_data.py
        (latent_stream.LatentSample for a latent dataset)."""
        logical = self._logical_worker() if logical_worker is None else logical_worker
        stream = self.open_stream(logical)
        if self.latents:
            while True:
                yield stream.next_sample()
        batcher = self.open_batcher(stream, logical)
        while True:
            with single_thread_blas():
                _, _, samples = batcher.next_batch()
            yield from samples

    def open_batcher(self, stream: WorkerStream, logical_worker: int) -> BucketBatcher:
        """The logical worker's batches, by bucket (bucket_stream.py), resumed with its saved pending records."""
        saved = self.resume_plan.workers[logical_worker] or {}
        return BucketBatcher(stream, self.buckets, self.batch_size, saved.get("pending", []),
                             self.resume_plan.regroup)

    def tokenize(self, captions: List[str]) -> np.ndarray:
        L = self.model_max_length
        ids = self.tokenizer(captions, padding="max_length", truncation=True, max_length=L,
                             return_attention_mask=False)["input_ids"]
        arr = np.asarray(ids, dtype=np.int64)
        if arr.shape != (len(captions), L):
            raise ValueError(f"tokenizer returned input_ids of shape {arr.shape}, expected {(len(captions), L)}")
        return arr

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        try:
            yield from self._batches()
        except LoaderError as e:
            yield error_batch(str(e))
        except Exception as e:  # noqa: BLE001 - must not escape: paddle's reader thread would die silently
            logger.exception("data loader failed")  # a bug of ours: the traceback is worth its lines
            yield error_batch(failure_line(f"rank {self.layout.rank}", f"the loader failed: {e!r}"[:2000], {},
                                           "This is a bug in the loader; its traceback is in the log above."))

    def _batches(self) -> Iterator[Dict[str, Any]]:
        logical = self._logical_worker()
        stream = self.open_stream(logical)
        saved = self.resume_plan.workers[logical]
        batches = int(saved.get("batches", 0)) if saved else 0
        g = self.layout.global_id(logical)
        if self.latents:
            yield from self._latent_batches(stream, logical, g, batches)
            return
        batcher = self.open_batcher(stream, logical)
        named = self.data.aspect_ratio_buckets is not None  # the tracker counts samples per bucket
        while True:
            with single_thread_blas():  # per batch, not around the yield: the consumer may be this process
                bucket, pixels, samples = batcher.next_batch()
            batches += 1
            batch: Dict[str, Any] = {"pixel_values": pixels}
            if self.tokenizer is not None:
                batch["input_ids"] = self.tokenize([s.caption for s in samples])
            batch["loader_state"] = batch_state(logical, g, batcher.state(), batches,
                                                bucket_name(bucket) if named else None)
            yield batch


    def _latent_batches(self, stream: LatentWorkerStream, logical: int, g: int, batches: int
                        ) -> Iterator[Dict[str, Any]]:
        """{"latent_mean", "latent_std": float32 [B,C,h,w] (unscaled posterior), "input_ids": int64 [B,L] or
        "encoder_hidden_states": float32 [B,L,D] when the text embeddings are cached, "loader_state"}."""
        while True:
            samples = [stream.next_sample() for _ in range(self.batch_size)]
            batches += 1
            batch: Dict[str, Any] = {"latent_mean": np.stack([s.mean for s in samples]),
                                     "latent_std": np.stack([s.std for s in samples])}
            if self.text_embeddings:
                batch["encoder_hidden_states"] = np.stack([s.text for s in samples]).astype(np.float32)
            else:
                batch["input_ids"] = np.stack([s.input_ids for s in samples]).astype(np.int64)
            batch["loader_state"] = batch_state(logical, g, stream.state(), batches)
            yield batch


def error_batch(line: str) -> Dict[str, Any]:
    """The last batch of a failed stream. It carries an array besides the line: paddle's single-process reader
    silently drops a batch that holds no tensor."""
    return {ERROR_KEY: line, "pixel_values": np.zeros((1,), np.float32)}


def build_dataloader(dataset: TextImageDataset) -> paddle.io.DataLoader:
    """The dataset batches itself, so batch_size=None; paddle then converts the numpy arrays to tensors and
    passes the loader_state str through unchanged (checked in tests/test_loader_resume.py)."""
    return paddle.io.DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers,
                                use_shared_memory=dataset.num_workers > 0)
