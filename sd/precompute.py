"""Encode once: the VAE posterior moments and text embeddings of a dataset's training crops, as a latent dataset.

    python precompute_latents.py --file_list OUT/filelist/NAME.filelist.list --pretrained_model_name_or_path DIR \
        --resolution 256 --random_flip True --output_path LATENTS [--output_name NAME]
    python -m paddle.distributed.launch --gpus 0,1,2,3 precompute_latents.py ...   (same flags, one rank per card)

Parse (PrecomputeArguments), resolve (PrecomputeRun: components by sd/components.py's train rules, the input's
parts, the dependency fingerprint), run. The format (shards, filelists, manifest, reader) is
data_tools/latent_format.py. Records are read as the loader reads them (file list: data_tools/filelists; lines,
fields: data_tools/part_format) and cropped by the loader's own ImageTransform with its center crop; rejects
(a record the loader would skip) go to NAME.rejects.jsonl, never silently lost.

Work split: the input filelist's distinct part i becomes shard i, and rank r encodes the parts i with
i % world == r. A shard depends only on its part and the settings, so the output is byte-identical whatever the
world size (tested: 1 process vs 2 ranks, by sha256). Ranks without a part just join the final gather. After it,
rank 0 writes the filelists, the rejects and the manifest. The launch checks are training's own
(trainer/launch/rank_checks.rank_preflight: shared output folder, same data, rank watchdog).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np

from data_tools import latent_format as lf
from data_tools.fileio import sha256_file
from data_tools.filelists import FILELIST_DIR_NAME, data_format_of, manifest_for_filelist, read_filelist_list
from data_tools.part_format import DATA_FORMATS, RecordError, iter_part_lines, parse_record
from data_tools.pixels import upright_size
from sd.components import Components, resolve_components, tokenizer_max_length
from sd.paths import UNET_TINY_CONFIG
from trainer.loader.config import DataArguments
from trainer.loader.transforms import INTERPOLATIONS, ImageTransform

logger = logging.getLogger("sd")
CREATED_BY = "precompute_latents.py"


@dataclass(frozen=True)
class PrecomputeArguments:
    file_list: str = field(default=None, metadata={"help": "A .filelist.list of image parts (one filelist)."})
    output_path: str = field(default=None, metadata={"help": "Output folder of the latent dataset."})
    output_name: str = field(default="latents", metadata={"help": "Dataset name: latents/NAME/, NAME.filelist, ..."})
    pretrained_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "An init or pipeline folder (vae/, text_encoder/, tokenizer/)."})
    vae_name_or_path: Optional[str] = field(default=None, metadata={"help": "Folder of an AutoencoderKL."})
    text_encoder_name_or_path: Optional[str] = field(default=None, metadata={"help": "Folder of a CLIPTextModel."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Folder of a CLIPTokenizer."})
    resolution: int = field(default=512, metadata={"help": "Training crop size (shorter side resized, then crop)."})
    center_crop: bool = field(default=True, metadata={
        "help": "Must be True: the latents are of the center crop (a random crop draws anew every epoch)."})
    random_flip: bool = field(default=False, metadata={"help": "Also store the mirrored crop's moments."})
    interpolation: str = field(default="lanczos", metadata={"help": "Resize filter, as the loader's.",
                                                             "choices": list(INTERPOLATIONS)})
    data_format: Optional[str] = field(default=None, metadata={"help": "Record format; unset: the manifest's.",
                                                               "choices": list(DATA_FORMATS)})
    min_image_size: int = field(default=0, metadata={"help": "Reject images whose shorter side is smaller."})
    latent_dtype: str = field(default="float16", metadata={"help": "Stored dtype of moments and embeddings.",
                                                           "choices": list(lf.LATENT_DTYPES)})
    text_embeddings: bool = field(default=True, metadata={
        "help": "Store the text encoder's last hidden state; False: token ids only (the trainer encodes)."})
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "Tokenizer padding/truncation length (default: the tokenizer's own "
                                "model_max_length, as in training)."})
    batch_size: int = field(default=16, metadata={"help": "Records per VAE / text encoder call."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Threads decoding and cropping the next batch while one is encoded (0: inline)."})
    resume: bool = field(default=False, metadata={"help": "Complete an interrupted run, keeping verified shards."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing latent dataset of this name."})
    progress_interval: float = field(default=10.0, metadata={"help": "Seconds between progress lines."})

    def __post_init__(self) -> None:
        if not self.file_list:
            raise ValueError("--file_list is required (a .filelist.list of image parts)")
        if not os.path.isfile(self.file_list):
            raise FileNotFoundError(f"--file_list: no such file: {self.file_list}")
        if not self.output_path:
            raise ValueError("--output_path is required")
        if not self.output_name or "/" in self.output_name or self.output_name in (".", ".."):
            raise ValueError(f"--output_name must be a plain file name, got {self.output_name!r}")
        if not self.center_crop:
            raise ValueError("--center_crop must be True, got False: a random crop is drawn anew every epoch and "
                             "cannot be cached; the latents are of the center crop (plus its mirror with "
                             "--random_flip). Train from them with --center_crop True, or train from images")
        checks = [(self.resolution > 0 and self.resolution % 8 == 0,
                   f"--resolution must be a positive multiple of 8, got {self.resolution}"),
                  (self.latent_dtype in lf.LATENT_DTYPES,
                   f"--latent_dtype must be one of {list(lf.LATENT_DTYPES)}, got {self.latent_dtype!r}"),
                  (self.interpolation in INTERPOLATIONS,
                   f"--interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}"),
                  (self.data_format is None or self.data_format in DATA_FORMATS,
                   f"--data_format must be one of {list(DATA_FORMATS)} (or unset), got {self.data_format!r}"),
                  (self.min_image_size >= 0, f"--min_image_size must be >= 0, got {self.min_image_size}"),
                  (self.model_max_length is None or self.model_max_length >= 2,
                   f"--model_max_length must be >= 2, got {self.model_max_length}"),
                  (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
                  (self.dataloader_num_workers >= 0,
                   f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}"),
                  (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other, got both"),
                  (self.progress_interval >= 0, f"--progress_interval must be >= 0, got {self.progress_interval}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class PrecomputeRun:
    """What runs: the parsed flags plus the resolved input, components, outputs and what the latents depend on."""

    args: PrecomputeArguments
    file_list: str  # absolute
    filelist: str  # the input's one .filelist
    parts: Tuple[str, ...]  # its parts, repeats kept (its order)
    distinct_parts: Tuple[str, ...]  # part i -> shard i + 1
    part_index: Tuple[int, ...]  # distinct part i's index in parts (its first place): the "part" of its record ids
    data_format: str
    source_manifest: Optional[str]
    components: Components
    data: DataArguments  # the loader's settings of the crop (center, no random flip): ImageTransform reads them
    output_path: str
    dependencies: dict  # manifest "dependencies": VAE, text encoder and tokenizer fingerprints, crop, dtypes
    notices: Tuple[str, ...]

    @property
    def shards_dir(self) -> str:
        return lf.shards_dir(self.output_path, self.args.output_name)

    def out(self, suffix: str) -> str:
        """OUT/NAME<suffix>, or OUT/filelist/NAME<suffix> for filelists."""
        folder = os.path.join(self.output_path, FILELIST_DIR_NAME) if suffix.startswith(".filelist") else \
            self.output_path
        return os.path.join(folder, self.args.output_name + suffix)


def resolve(args: PrecomputeArguments) -> PrecomputeRun:
    file_list = os.path.abspath(args.file_list)
    sources = read_filelist_list(file_list)
    if len(sources) != 1:
        raise ValueError(f"--file_list {file_list} names {len(sources)} filelists: precompute each to a latent "
                         "dataset of its own (one --output_name each) and list their filelists, with weights, in "
                         "one .filelist.list for training")
    src = sources[0]
    # The UNet is not this stage's: a placeholder config meets the train rule's required UNet without reading
    # the root's unet/ (see the report: a purpose that needs no UNet would say it better).
    comps = resolve_components("train", args.pretrained_model_name_or_path, vae=args.vae_name_or_path,
                               text_encoder=args.text_encoder_name_or_path, tokenizer=args.tokenizer_name,
                               unet=UNET_TINY_CONFIG)
    args = dataclasses.replace(args, model_max_length=args.model_max_length or tokenizer_max_length(comps.tokenizer))
    vae = lf.folder_fingerprint(comps.vae, weights=True)
    factor = 2 ** (len(vae["config"]["block_out_channels"]) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution must be a multiple of the VAE's factor {factor}, got {args.resolution}")
    data_format = data_format_of(src.filelist, args.data_format)
    data = DataArguments(file_list=file_list, resolution=args.resolution, data_format=data_format,
                         interpolation=args.interpolation, center_crop=True, random_flip=False,
                         min_image_size=args.min_image_size)
    deps = {"moments": "mean_std", "vae": vae, "scaling_factor": float(vae["config"].get("scaling_factor", 0.18215)),
            "latent_factor": factor, "latent_channels": int(vae["config"]["latent_channels"]),
            "latent_size": args.resolution // factor, "resolution": args.resolution, "crop": "center",
            "random_flip": args.random_flip, "interpolation": args.interpolation, "data_format": data_format,
            "min_image_size": args.min_image_size, "max_image_pixels": data.max_image_pixels,
            "latent_dtype": args.latent_dtype, "text_embeddings": args.text_embeddings,
            "text_encoder": lf.folder_fingerprint(comps.text_encoder, weights=True) if args.text_embeddings else None,
            "tokenizer": lf.folder_fingerprint(comps.tokenizer, weights=False),
            "model_max_length": args.model_max_length}
    notices = ["the latents are of the center crop (a random crop cannot be cached): train from them with "
               "--center_crop True" + (" --random_flip True (mirrored moments stored too)" if args.random_flip
                                       else "")]
    if not args.text_embeddings:
        notices.append("--text_embeddings False: token ids only; the trainer runs the text encoder")
    first = {}
    for i, p in enumerate(src.parts):
        first.setdefault(p, i)
    return PrecomputeRun(args, file_list, src.filelist, src.parts, tuple(first), tuple(first.values()), data_format,
                         manifest_for_filelist(src.filelist), comps, data, os.path.abspath(args.output_path), deps,
                         tuple(notices))


# ----------------------------------------------------------------------------------------------- encoding
class Encoder:
    """The frozen VAE, tokenizer and text encoder, used as the training step uses them (sd/model.py)."""

    def __init__(self, run: PrecomputeRun):
        from paddlenlp.transformers import CLIPTokenizer
        from ppdiffusers import AutoencoderKL
        from ppdiffusers.transformers import CLIPTextModel

        self.max_length = run.args.model_max_length
        self.vae = AutoencoderKL.from_pretrained(run.components.vae)
        self.vae.eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(run.components.tokenizer, model_max_length=self.max_length)
        self.text_encoder = None
        if run.args.text_embeddings:
            self.text_encoder = CLIPTextModel.from_pretrained(run.components.text_encoder)
            self.text_encoder.eval()

    def moments(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        import paddle

        with paddle.no_grad():
            posterior = self.vae.encode(paddle.to_tensor(pixels)).latent_dist
            return posterior.mean.astype("float32").numpy(), posterior.std.astype("float32").numpy()

    def tokenize(self, captions: List[str]) -> np.ndarray:
        """As the loader tokenizes (TextImageDataset.tokenize)."""
        ids = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_attention_mask=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64).reshape(len(captions), self.max_length)

    def text(self, input_ids: np.ndarray) -> np.ndarray:
        import paddle

        with paddle.no_grad():
            return self.text_encoder(paddle.to_tensor(input_ids))[0].astype("float32").numpy()


@dataclass
class Item:
    line: int
    caption: str
    header: object  # an opened, checked PIL image
    crops: Optional[Tuple[np.ndarray, ...]] = None
    error: Optional[RecordError] = None


def read_items(path: str, run: PrecomputeRun, transform: ImageTransform, rejects: list) -> Iterator[Item]:
    """The part's records that pass the loader's header checks; every other line is appended to `rejects`."""
    try:
        for line, raw in iter_part_lines(path, 0, run.data.max_line_bytes):
            if raw is None:
                rejects.append({"line": line, "reason": "line_too_long", "detail": f"> {run.data.max_line_bytes}"})
                continue
            try:
                caption, image = parse_record(raw, run.data_format)
                yield Item(line, caption, transform.open_checked(image))
            except RecordError as e:
                rejects.append({"line": line, "reason": e.reason, "detail": e.detail[:500]})
    except RecordError as e:  # unreadable or truncated part: the records before the damage were kept
        rejects.append({"line": None, "reason": e.reason, "detail": e.detail[:500]})


def crop(item: Item, transform: ImageTransform, flip: bool) -> Item:
    """The loader's center crop (ImageTransform.plan with center_crop) and, with `flip`, its mirror."""
    try:
        size = upright_size(item.header)
        plan = transform.plan(*size, np.random.default_rng(0))  # center crop: the draws are not used
        img = transform.decode(item.header)
        plans = (plan, dataclasses.replace(plan, flip=True)) if flip else (plan,)
        item.crops = tuple(transform.resize_crop(img, size, p) for p in plans)
    except RecordError as e:
        item.error = e
    item.header = None
    return item


def batches(items: Iterator[Item], size: int, prepare, pool: Optional[ThreadPoolExecutor]) -> Iterator[List[Item]]:
    """Consecutive batches of prepared items; with a pool, the next batch is prepared while one is encoded. The
    batches are cut before preparing, so they do not depend on the thread count."""
    pending = None
    while True:
        chunk = [it for _, it in zip(range(size), items)]
        if pool is None:
            if not chunk:
                return
            yield [prepare(it) for it in chunk]
            continue
        futures = [pool.submit(prepare, it) for it in chunk]
        if pending:
            yield [f.result() for f in pending]
        if not chunk:
            return
        pending = futures


def encode_shard(run: PrecomputeRun, enc: Encoder, transform: ImageTransform, index: int,
                 pool: Optional[ThreadPoolExecutor]) -> dict:
    """Input part `index` (0-based, of run.distinct_parts) -> shard index + 1. Returns its manifest entry."""
    part = run.distinct_parts[index]
    path = os.path.join(run.shards_dir, lf.shard_name(index + 1))
    part_idx = run.part_index[index]
    rejects: list = []
    out = {k: [] for k in ("mean", "std", "mean_flip", "std_flip", "input_ids", "text")}
    ids, captions = [], []
    flip, dtype = run.args.random_flip, run.args.latent_dtype
    for batch in batches(read_items(part, run, transform, rejects), run.args.batch_size,
                         lambda it: crop(it, transform, flip), pool):
        for it in batch:
            if it.error is not None:
                rejects.append({"line": it.line, "reason": it.error.reason, "detail": it.error.detail[:500]})
        good = [it for it in batch if it.error is None]
        if not good:
            continue
        for j, keys in enumerate((("mean", "std"), ("mean_flip", "std_flip"))[: 2 if flip else 1]):
            mean, std = enc.moments(np.stack([it.crops[j] for it in good]))
            out[keys[0]].append(mean)
            out[keys[1]].append(std)
        tokens = enc.tokenize([it.caption for it in good])
        out["input_ids"].append(tokens)
        if enc.text_encoder is not None:
            out["text"].append(enc.text(tokens))
        ids += [(0, part_idx, it.line) for it in good]
        captions += [it.caption for it in good]
    n, c, s, L = len(ids), run.dependencies["latent_channels"], run.dependencies["latent_size"], enc.max_length
    empty_ids = enc.tokenize([""])
    tensors = {}
    for k in lf.MOMENT_KEYS + (lf.FLIP_KEYS if flip else ()):
        tensors[k] = (lf.to_storage(np.concatenate(out[k]) if n else np.zeros((0, c, s, s)), dtype), dtype)
    tensors["input_ids"] = ((np.concatenate(out["input_ids"]) if n else np.zeros((0, L))).astype(np.int32), "int32")
    tensors["empty_input_ids"] = (empty_ids.astype(np.int32), "int32")
    if enc.text_encoder is not None:
        empty = enc.text(empty_ids)
        text = np.concatenate(out["text"]) if n else np.zeros((0,) + empty.shape[1:], np.float32)
        tensors["text"] = (lf.to_storage(text, dtype), dtype)
        tensors["empty_text"] = (lf.to_storage(empty, dtype), dtype)
    tensors["record_id"] = (np.asarray(ids, dtype=np.int64).reshape(n, 3), "int64")
    offsets, blob = lf.captions_to_tensors(captions)
    tensors["caption_offsets"], tensors["caption_bytes"] = (offsets, "int64"), (blob, "uint8")
    meta = shard_meta(run, index, part, n, rejects)
    size, digest = lf.write_shard(path, tensors, meta)
    return shard_entry(path, meta, size, digest)


def shard_meta(run: PrecomputeRun, index: int, part: str, records: int, rejects: list) -> dict:
    return {"format": lf.SHARD_FORMAT, "format_version": lf.FORMAT_VERSION, "index": index + 1, "records": records,
            "source_part": part, "source_part_bytes": os.path.getsize(part), "source_part_sha256": sha256_file(part),
            "rejects": rejects, "dependencies_sha256": lf.dependencies_digest(run.dependencies)}


def shard_entry(path: str, meta: dict, size: int, digest: str) -> dict:
    return {"path": path, "index": meta["index"], "records": meta["records"], "rejected": len(meta["rejects"]),
            "bytes": size, "sha256": digest, "source_part": meta["source_part"],
            "source_part_sha256": meta["source_part_sha256"], "rejects": meta["rejects"]}


def resumable(run: PrecomputeRun, index: int) -> Optional[dict]:
    """The manifest entry of shard index + 1 when a complete one made from the same part and settings is on disk."""
    path = os.path.join(run.shards_dir, lf.shard_name(index + 1))
    if not os.path.isfile(path):
        return None
    part = run.distinct_parts[index]
    with lf.LatentShard(path) as shard:
        meta = shard.metadata
    same = (meta.get("index") == index + 1 and meta.get("source_part") == part
            and meta.get("dependencies_sha256") == lf.dependencies_digest(run.dependencies)
            and meta.get("source_part_bytes") == os.path.getsize(part)
            and meta.get("source_part_sha256") == sha256_file(part))
    return shard_entry(path, meta, os.path.getsize(path), sha256_file(path)) if same else None
