"""The configuration of create_pretraining_data.py: every flag declared, defaulted and validated once.

    CreateDataArguments   the flags (the command line is generated from it by sd.config.parse_args)
    resolve(args)         -> CreateDataRun: the same fields with resolved values (absolute output path and image
                          root, the core count for --num_workers) plus what is derived from them (the expanded
                          input files, the image root of each)

The resolved run is what runs: the main process reads it, each pool worker receives it once, and the manifest
records it as its "arguments". A field typed `PartBytes[...]` changes the bytes of a part, so its resolved value
goes into the journal's "settings", which a --resume run must match exactly (part_settings).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from glob import glob
from typing import Annotated, List, Optional, Tuple, TypeVar, get_type_hints

from data_tools.create_outputs import CreateDataError
from data_tools.img2dataset import FOLDER_SUFFIXES, check_parquet_input
from trainer.loader.buckets import DEFAULT_STEP, bucket_set

# PIL's own default bound (Image.MAX_IMAGE_PIXELS): ~ a 9459 x 9459 image, 268 MB as RGB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# A jsonl record is a caption and a path: 16 MiB is far above any real one and bounds what one line can cost.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
# Above any photo a trainer wants (a 100 MP JPEG is ~30 MB); refused by size before a byte is read.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
# 50 M distinct images: 800 MB of digests (filters.DigestIndex), ~2 GB at its largest merge.
DEFAULT_DEDUP_MAX_IMAGES = 50_000_000
INPUT_FORMATS = ("jsonl", "webdataset", "parquet")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _PartBytesMarker:
    def __repr__(self) -> str:
        return "PART_BYTES"


# A marker in the type, not in field metadata: PdArgumentParser hands every metadata key to argparse's
# add_argument, which refuses unknown ones, while it reads types through get_type_hints, which drops Annotated.
PART_BYTES = _PartBytesMarker()
_T = TypeVar("_T")
PartBytes = Annotated[_T, PART_BYTES]
# A PartBytes field added after the journal's settings were fixed: in the settings only when not at its default,
# so a run that does not use it keeps the settings (and resumes the journals) of the runs before it existed.
PART_BYTES_IF_SET = _PartBytesMarker()
PartBytesIfSet = Annotated[_T, PART_BYTES, PART_BYTES_IF_SET]


@dataclass(frozen=True)
class CreateDataArguments:
    """The flags of create_pretraining_data.py. The reference's flags keep their names and defaults
    (input_path .. num_repeat); the others are this tool's."""

    output_path: str = field(metadata={"help": "output folder"})
    input_path: List[str] = field(default_factory=list, metadata={
        "help": "input file(s) and/or glob(s), globs expand sorted; with --input_format webdataset or parquet "
                "also folders (their .tar / .parquet files, sorted) (required unless --merge_shards)"})
    input_format: PartBytesIfSet[str] = field(default="jsonl", metadata={
        "help": "jsonl: {caption, image path} lines; webdataset: img2dataset's tar shards (KEY.jpg|png|webp, "
                "KEY.txt, KEY.json); parquet: img2dataset's metadata (.parquet, or .jsonl of the same columns) "
                "beside its image folders (--output_format files: SHARD.parquet + SHARD/KEY.jpg)"})
    output_name: str = field(default="custom_dataset", metadata={
        "help": "name of the dataset: its parts folder (laion400m_format_data/NAME/), filelist, manifest, rejects"})
    caption_key: PartBytes[str] = field(default="caption", metadata={"help": "jsonl key of the caption"})
    image_key: PartBytes[str] = field(default="image", metadata={"help": "jsonl key of the image path"})
    per_part_file_num: PartBytes[int] = field(default=1000, metadata={"help": "input records per part file"})
    save_gzip_file: PartBytes[bool] = field(default=False, metadata={"help": "gzip the parts (part-XXXXXX.gz)"})
    num_repeat: int = field(default=1, metadata={"help": "times the part list is repeated in the filelist"})
    num_workers: Optional[int] = field(default=None, metadata={
        "help": "decode processes (0: none, in-process; None: the core count)"})
    gzip_level: PartBytes[int] = field(default=6, metadata={
        "help": "zlib-style level 0-9 (ISA-L uses 0-3: level // 3)"})
    image_root: PartBytes[Optional[str]] = field(default=None, metadata={
        "help": "folder image paths resolve against (None: each jsonl's folder)"})
    allow_outside_root: PartBytes[bool] = field(default=False, metadata={
        "help": "accept image paths that resolve outside the root"})
    allow_empty_caption: PartBytes[bool] = field(default=False, metadata={
        "help": "keep records whose caption is blank"})
    max_image_pixels: PartBytes[int] = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={
        "help": "reject larger images (w*h)"})
    max_image_bytes: PartBytes[int] = field(default=DEFAULT_MAX_IMAGE_BYTES, metadata={
        "help": "reject larger image files, by their size, before reading them"})
    max_line_bytes: PartBytes[int] = field(default=DEFAULT_MAX_LINE_BYTES, metadata={
        "help": "reject longer jsonl lines, skipped without holding them in memory"})
    min_image_size: PartBytes[int] = field(default=0, metadata={
        "help": "reject images whose shorter side is smaller"})
    max_aspect_ratio: PartBytesIfSet[Optional[float]] = field(default=None, metadata={
        "help": "reject images whose longer side / shorter side (decoded size) is larger"})
    max_pwatermark: PartBytesIfSet[Optional[float]] = field(default=None, metadata={
        "help": "reject records whose pwatermark score is larger (or missing)"})
    max_punsafe: PartBytesIfSet[Optional[float]] = field(default=None, metadata={
        "help": "reject records whose punsafe score is larger (or missing)"})
    min_aesthetic: PartBytesIfSet[Optional[float]] = field(default=None, metadata={
        "help": "reject records whose aesthetic score (aesthetic, AESTHETIC_SCORE) is smaller (or missing)"})
    min_similarity: PartBytesIfSet[Optional[float]] = field(default=None, metadata={
        "help": "reject records whose CLIP similarity score is smaller (or missing)"})
    dedup: PartBytesIfSet[bool] = field(default=False, metadata={
        "help": "reject exact duplicate images (equal bytes), keeping the first in input order"})
    dedup_max_images: int = field(default=DEFAULT_DEDUP_MAX_IMAGES, metadata={
        "help": "distinct images the --dedup index may hold (16 bytes each); more stops the run"})
    # Not part bytes but the manifest's per-bucket counts: a resumed run and the shards of a merge must agree.
    aspect_ratio_buckets: PartBytesIfSet[Optional[str]] = field(default=None, metadata={
        "help": "count the written records per aspect-ratio bucket of this set in the manifest, as the loader's "
                "--aspect_ratio_buckets assigns them (a target side N or a list WxH,...); parts do not change"})
    bucket_step: PartBytesIfSet[int] = field(default=DEFAULT_STEP, metadata={
        "help": "sides of the default bucket list are multiples of this (the loader's --bucket_step)"})
    max_side: PartBytes[Optional[int]] = field(default=None, metadata={
        "help": "downscale larger images to this longer side (JPEG re-encode)"})
    jpeg_quality: PartBytes[int] = field(default=95, metadata={"help": "JPEG quality of --max_side re-encodes"})
    resume: bool = field(default=False, metadata={
        "help": "complete an interrupted run, keeping its verified parts"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output of this name"})
    num_shards: PartBytes[int] = field(default=1, metadata={
        "help": "split the work over this many runs (machines)"})
    shard_id: PartBytes[int] = field(default=0, metadata={"help": "which shard this run does, 0..num_shards-1"})
    merge_shards: bool = field(default=False, metadata={
        "help": "combine the finished shards into NAME's filelist/manifest"})
    max_reject_ratio: float = field(default=1.0, metadata={
        "help": "fail (exit 3) when more records are rejected"})
    progress_interval: float = field(default=2.0, metadata={"help": "seconds between progress lines"})

    def __post_init__(self) -> None:
        checks = [
            (bool(self.input_path) or self.merge_shards,
             "--input_path is required (unless --merge_shards)"),
            (bool(self.output_path), "--output_path must name a folder, got ''"),
            (bool(self.output_name) and "/" not in self.output_name and self.output_name not in (".", "..")
             and not _CONTROL.search(self.output_name),
             f"--output_name must be a plain file name, got {self.output_name!r}"),
            # the filelists hold one path a line: a line break in a path would split it in two
            (not _CONTROL.search(self.output_path),
             f"--output_path must not contain control characters (line breaks), got {self.output_path!r}"),
            (self.per_part_file_num >= 1, f"--per_part_file_num must be >= 1, got {self.per_part_file_num}"),
            (self.num_repeat >= 1, f"--num_repeat must be >= 1, got {self.num_repeat}"),
            (self.num_workers is None or self.num_workers >= 0,
             f"--num_workers must be >= 0, got {self.num_workers}"),
            (0 <= self.gzip_level <= 9, f"--gzip_level must be in 0..9, got {self.gzip_level}"),
            (self.max_image_pixels >= 1, f"--max_image_pixels must be >= 1, got {self.max_image_pixels}"),
            (self.max_image_bytes >= 1, f"--max_image_bytes must be >= 1, got {self.max_image_bytes}"),
            (self.max_line_bytes >= 1, f"--max_line_bytes must be >= 1, got {self.max_line_bytes}"),
            (self.min_image_size >= 0, f"--min_image_size must be >= 0, got {self.min_image_size}"),
            (self.input_format in INPUT_FORMATS,
             f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}"),
            (_in_range(self.max_aspect_ratio, 1.0, math.inf),
             f"--max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}"),
            (_in_range(self.max_pwatermark, 0.0, 1.0), f"--max_pwatermark must be in 0..1, got {self.max_pwatermark}"),
            (_in_range(self.max_punsafe, 0.0, 1.0), f"--max_punsafe must be in 0..1, got {self.max_punsafe}"),
            (_in_range(self.min_aesthetic, -math.inf, math.inf),
             f"--min_aesthetic must be a finite number, got {self.min_aesthetic}"),
            (_in_range(self.min_similarity, -1.0, 1.0),
             f"--min_similarity must be in -1..1, got {self.min_similarity}"),
            (self.dedup_max_images >= 1, f"--dedup_max_images must be >= 1, got {self.dedup_max_images}"),
            (self.max_side is None or self.max_side >= 1, f"--max_side must be >= 1, got {self.max_side}"),
            (1 <= self.jpeg_quality <= 100, f"--jpeg_quality must be in 1..100, got {self.jpeg_quality}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other, got both"),
            (self.num_shards >= 1, f"--num_shards must be >= 1, got {self.num_shards}"),
            (0 <= self.shard_id < self.num_shards,
             f"--shard_id must be in 0..{self.num_shards - 1}, got {self.shard_id}"),
            (not self.merge_shards or self.num_shards >= 2,
             f"--merge_shards needs --num_shards >= 2, got {self.num_shards}"),
            (0.0 <= self.max_reject_ratio <= 1.0, f"--max_reject_ratio must be in 0..1, got {self.max_reject_ratio}"),
            (self.progress_interval >= 0, f"--progress_interval must be >= 0, got {self.progress_interval}"),
            (self.image_root is None or os.path.isdir(self.image_root),
             f"--image_root must be a folder, got {self.image_root}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.aspect_ratio_buckets is not None:
            try:
                bucket_set(self.aspect_ratio_buckets, self.bucket_step)
            except ValueError as e:
                raise ValueError(f"--aspect_ratio_buckets {self.aspect_ratio_buckets!r}: {e}") from None


def _in_range(value: Optional[float], lo: float, hi: float) -> bool:
    """An optional threshold: off (None), or a finite number in lo..hi (NaN is in no range)."""
    return value is None or (math.isfinite(value) and lo <= value <= hi)


@dataclass(frozen=True)
class CreateDataRun(CreateDataArguments):
    """A run's resolved configuration: every flag (output_path and image_root absolute, num_workers a number)
    plus the values derived from them. Made by resolve() only; frozen and picklable (sent to each worker)."""

    input_files: Tuple[str, ...] = field(default=(), kw_only=True)  # absolute, globs expanded, in order
    image_roots: Tuple[str, ...] = field(default=(), kw_only=True)  # image root of each input file, by index
    buckets: Tuple[Tuple[int, int], ...] = field(default=(), kw_only=True)  # --aspect_ratio_buckets as (w, h)

    def score_limits(self) -> dict:
        """The score filters' thresholds by flag name (None: off), as filters.score_reject takes them."""
        return {name: getattr(self, name) for name in ("max_pwatermark", "max_punsafe", "min_aesthetic",
                                                       "min_similarity")}

    def part_settings(self) -> dict:
        """The resolved values of the PartBytes fields: a resumed run must match them exactly."""
        hints = get_type_hints(CreateDataArguments, include_extras=True)
        out = {}
        for f in fields(CreateDataArguments):
            marks = getattr(hints[f.name], "__metadata__", ())
            if PART_BYTES in marks and not (PART_BYTES_IF_SET in marks and getattr(self, f.name) == f.default):
                out[f.name] = getattr(self, f.name)
        return out


def resolve(args: CreateDataArguments) -> CreateDataRun:
    """The run of `args` on this machine. Raises CreateDataError (exit 1) when an input file is unusable."""
    # --merge_shards reads only the shards' manifests: its inputs may live on other machines.
    inputs = () if args.merge_shards else tuple(expand_inputs(args.input_path, args.input_format))
    if args.input_format == "parquet":
        for path in inputs:  # a metadata file without the columns we need stops the run here, not mid-way
            check_parquet_input(path, args.caption_key)
    if os.path.exists(args.output_path) and not os.path.isdir(args.output_path):
        raise CreateDataError(f"--output_path {os.path.abspath(args.output_path)} exists and is not a folder")
    root = os.path.abspath(args.image_root) if args.image_root else None
    parsed = {f.name: getattr(args, f.name) for f in fields(CreateDataArguments)}
    parsed.update(output_path=os.path.abspath(args.output_path), image_root=root,
                  num_workers=(os.cpu_count() or 1) if args.num_workers is None else args.num_workers)
    buckets = () if args.aspect_ratio_buckets is None else bucket_set(args.aspect_ratio_buckets, args.bucket_step)
    return CreateDataRun(**parsed, input_files=inputs, image_roots=tuple(root or os.path.dirname(s) for s in inputs),
                         buckets=tuple(buckets))


def expand_inputs(patterns: List[str], input_format: str = "jsonl") -> List[str]:
    """Absolute input paths: plain paths in the order given, globs expanded sorted, and (webdataset, parquet) a
    folder as its files of that format, sorted. Each must be a readable file, named once."""
    paths: List[str] = []
    for pattern in patterns:
        matches = sorted(glob(pattern)) if re.search(r"[*?[]", pattern) else [pattern]
        if not matches:
            raise CreateDataError(f"--input_path {pattern!r} matches no file")
        for m in _folders_expanded(matches, input_format):
            path = os.path.abspath(m)
            if not os.path.isfile(path):
                raise CreateDataError(f"cannot read input file {path}: " +
                                      ("it is not a file" if os.path.exists(path) else "no such file"))
            if not os.access(path, os.R_OK):
                raise CreateDataError(f"cannot read input file {path}: permission denied")
            if path in paths:
                raise CreateDataError(f"input file {path} is named twice by --input_path")
            paths.append(path)
    return paths


def _folders_expanded(matches: List[str], input_format: str) -> List[str]:
    """`matches` with each folder replaced by its files of `input_format` (FOLDER_SUFFIXES), sorted; jsonl has no
    folder form (a folder stays what it was: an error naming it)."""
    suffixes = FOLDER_SUFFIXES.get(input_format)
    out: List[str] = []
    for m in matches:
        if suffixes and os.path.isdir(m):
            found = sorted(os.path.join(m, fn) for fn in os.listdir(m)
                           if fn.endswith(suffixes) and os.path.isfile(os.path.join(m, fn)))
            if not found:
                raise CreateDataError(f"--input_path {os.path.abspath(m)} is a folder without "
                                      f"{' / '.join(suffixes)} files (--input_format {input_format})")
            out += found
        else:
            out.append(m)
    return out
