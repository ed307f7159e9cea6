"""The latent dataset format: shards of VAE moments and text embeddings, their filelists and manifest.

A sibling of part_format.py (the image parts): precompute_latents.py (sd/precompute.py) writes it, training from
latents reads it through the functions below. Layout, for --output_path OUT and --output_name NAME:

    OUT/latents/NAME/shard-000001.safetensors   the records of the input's distinct part 1 (input order)
    OUT/filelist/NAME.filelist                  one shard path a line, in the input filelist's order (repeats kept)
    OUT/filelist/NAME.filelist.list             that filelist, as `sh train.sh --file_list` takes it
    OUT/NAME.manifest.json                      "format": "sd_latents", counts, rejects, dependencies, shards
    OUT/NAME.rejects.jsonl                      every input record not encoded: part, line, reason, detail
    OUT/NAME.precompute_config.json             the resolved config of the run

The manifest sits where filelists.manifest_for_filelist looks for a dataset's manifest (OUT/NAME.manifest.json
beside OUT/filelist/NAME.filelist), so a filelist's format is told by its manifest, never by a file name.

A shard is a safetensors file (nothing pickled; safetensors.numpy reads every tensor but bfloat16, which
`LatentShard` reads itself). Every tensor but the `empty_*` ones has the record as its first axis:

    mean, std            [N, C, h, w]  --latent_dtype  posterior of the center crop, unscaled (h = resolution/factor)
    mean_flip, std_flip  [N, C, h, w]  --latent_dtype  posterior of the mirrored crop (--random_flip only)
    text                 [N, L, D]     --latent_dtype  the text encoder's last hidden state (--text_embeddings)
    input_ids            [N, L]        int32           the caption's token ids (always: 4 bytes a token)
    empty_text           [1, L, D]     --latent_dtype  the encoder on "" (caption dropout) (--text_embeddings)
    empty_input_ids      [1, L]        int32           the token ids of ""
    record_id            [N, 3]        int64           (source, part, line): the loader's reference of the record
    caption_offsets      [N + 1]       int64           record k's caption is caption_bytes[off[k]:off[k + 1]]
    caption_bytes        [total]       uint8           UTF-8 captions

Mean and std, not logvar: training draws latents = (mean + std * eps) * scaling_factor, so std is what it uses,
bit for bit in float32, with no exp() per sample; in float16 a std below 6e-5 is subnormal (relative error
<= 0.1% at 4.5e-5), which moves a latent by far less than its own float16 rounding. The shard's JSON metadata
(key "json") holds its index, record count, source part (path, bytes, sha256), rejects and the sha256 of the
dependencies it was encoded with, so a resumed run keeps a shard only when all of them still match.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.fileio import atomic_writer, sha256_file
from data_tools.filelists import manifest_for_filelist, read_filelist, read_filelist_list

LATENT_FORMAT = "sd_latents"
SHARD_FORMAT = "sd_latents_shard"
FORMAT_VERSION = 1
LATENTS_DIR_NAME = "latents"
LATENT_DTYPES = ("float16", "bfloat16", "float32")
MOMENT_KEYS = ("mean", "std")
FLIP_KEYS = ("mean_flip", "std_flip")
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors(\.tmp\.\d+)?$")
# safetensors header dtype -> numpy; "BF16" is read as its bits (numpy has no bfloat16) and widened exactly.
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
_SPEC = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64", "uint8": "uint8"}
_HEADER_MAX = 100 << 20  # safetensors' own limit


# ----------------------------------------------------------------------------------------------- names
def shard_name(index: int) -> str:
    """The file name of shard `index` (1-based, the index of the input part it encodes)."""
    return f"shard-{index:06d}.safetensors"


def shard_index(filename: str) -> Optional[int]:
    """The index of a shard (or shard temporary) file name written by this module; None for any other file."""
    m = _SHARD_RE.match(filename)
    return int(m.group(1)) if m else None


def shards_dir(output_path: str, output_name: str) -> str:
    return os.path.join(output_path, LATENTS_DIR_NAME, output_name)


# ----------------------------------------------------------------------------------------------- dtypes
def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored array: float16/float32 by numpy's round-to-nearest-even, bfloat16 as its uint16
    bits, rounded to nearest even (finite inputs; moments and embeddings are)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        bits = x.view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return x.astype(dtype)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------------------- writing
def write_shard(path: str, tensors: Dict[str, Tuple[np.ndarray, str]], meta: dict) -> Tuple[int, str]:
    """Write {name: (array, dtype)} (bfloat16 arrays as the uint16 bits of to_storage) and `meta` as one
    safetensors file, atomically (tmp + fsync + rename); returns (bytes, sha256). Equal inputs give equal bytes."""
    from safetensors import TensorSpec, serialize

    arrays = {k: np.ascontiguousarray(a) for k, (a, _) in tensors.items()}
    specs = {k: TensorSpec(dtype="bfloat16" if dt == "bfloat16" else _SPEC[arrays[k].dtype.name],
                           shape=list(arrays[k].shape), data_ptr=arrays[k].ctypes.data, data_len=arrays[k].nbytes)
             for k, (_, dt) in tensors.items()}
    data = serialize(specs, metadata={"json": json.dumps(meta, sort_keys=True, ensure_ascii=False)})
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return len(data), hashlib.sha256(data).hexdigest()


def captions_to_tensors(captions: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    encoded = [c.encode("utf-8") for c in captions]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()


def dependencies_digest(dependencies: dict) -> str:
    return hashlib.sha256(json.dumps(dependencies, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class LatentRecord:
    """One record, arrays widened to float32 (ids int64). Absent parts are None."""

    mean: np.ndarray  # [C, h, w]
    std: np.ndarray
    mean_flip: Optional[np.ndarray]
    std_flip: Optional[np.ndarray]
    text: Optional[np.ndarray]  # [L, D]
    input_ids: np.ndarray  # [L]
    caption: str
    record_id: Tuple[int, int, int]  # (source, part, line)


class LatentShard:
    """One shard, read lazily: opening parses the header only; record(k) reads record k's rows (one pread per
    tensor), so a shuffle buffer of references costs no memory. pread takes no file position, so one open shard
    may serve several threads. Use as a context manager, or close()."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        with safe_open(path, framework="np") as f:  # validates the header: offsets cover the data exactly
            keys = set(f.keys())
        self._fd = os.open(path, os.O_RDONLY)
        n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if not 0 < n <= _HEADER_MAX:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(os.pread(self._fd, n, 8))
        self._start = 8 + n
        self.metadata = json.loads(header.pop("__metadata__", {}).get("json", "{}"))
        if self.metadata.get("format") != SHARD_FORMAT or self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {SHARD_FORMAT} v{FORMAT_VERSION} shard (metadata format "
                             f"{self.metadata.get('format')!r} v{self.metadata.get('format_version')!r})")
        self._tensors = header
        if set(header) != keys:
            raise ValueError(f"{path}: header keys differ from safetensors' own reading")
        self.num_records = int(self.metadata["records"])
        self.keys = tuple(sorted(header))

    def dtype(self, name: str) -> str:
        return self._tensors[name]["dtype"]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._tensors[name]["shape"])

    def nbytes(self, name: str) -> int:
        b0, b1 = self._tensors[name]["data_offsets"]
        return b1 - b0

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Rows start:stop of tensor `name` along its first axis, as stored (bfloat16 widened to float32)."""
        t = self._tensors[name]
        shape, (b0, b1) = t["shape"], t["data_offsets"]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"{self.path}: rows {start}:{stop} of {name} (has {rows})")
        row_bytes = (b1 - b0) // max(rows, 1)
        raw = os.pread(self._fd, (stop - start) * row_bytes, self._start + b0 + start * row_bytes)
        arr = np.frombuffer(raw, dtype=_NP[t["dtype"]]).reshape([stop - start] + list(shape[1:]))
        return bf16_to_float32(arr) if t["dtype"] == "BF16" else arr

    def _row(self, name: str, k: int, dtype) -> Optional[np.ndarray]:
        return self.read(name, k, k + 1)[0].astype(dtype) if name in self._tensors else None

    def caption(self, k: int) -> str:
        a, b = self.read("caption_offsets", k, k + 2)
        return self.read("caption_bytes", int(a), int(b)).tobytes().decode("utf-8")

    def record(self, k: int) -> LatentRecord:
        if not 0 <= k < self.num_records:
            raise IndexError(f"{self.path}: record {k} of {self.num_records}")
        f32 = np.float32
        return LatentRecord(self._row("mean", k, f32), self._row("std", k, f32), self._row("mean_flip", k, f32),
                            self._row("std_flip", k, f32), self._row("text", k, f32),
                            self._row("input_ids", k, np.int64), self.caption(k),
                            tuple(int(v) for v in self.read("record_id", k, k + 1)[0]))

    def empty_text(self) -> Optional[np.ndarray]:
        """The text encoder's output on "" [L, D] (what a dropped caption trains with), when embeddings are stored."""
        return self._row("empty_text", 0, np.float32)

    def empty_input_ids(self) -> np.ndarray:
        return self._row("empty_input_ids", 0, np.int64)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "LatentShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class LatentSource:
    """One weighted latent filelist of a .filelist.list: its shards (in order, repeats kept) and its manifest."""

    filelist: str
    weight: float
    shards: Tuple[str, ...]
    manifest: dict


def is_latent_manifest(manifest: dict) -> bool:
    return manifest.get("format") == LATENT_FORMAT


def read_latent_manifest(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not is_latent_manifest(manifest):
        raise ValueError(f"{path}: not a latent dataset manifest (format {manifest.get('format')!r}, expected "
                         f"{LATENT_FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: {LATENT_FORMAT} format_version {manifest.get('format_version')!r} is not "
                         f"supported (expected {FORMAT_VERSION})")
    return manifest


def latent_manifest_of(filelist: str) -> Optional[dict]:
    """The latent manifest of a .filelist (OUT/NAME.manifest.json for OUT/filelist/NAME.filelist), or None when
    the filelist has no manifest or an image-part one."""
    path = manifest_for_filelist(filelist)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        kind = json.load(f).get("format")
    return read_latent_manifest(path) if kind == LATENT_FORMAT else None


def shards_of(filelist: str) -> List[str]:
    """The shard paths a latent .filelist lists (resolved as filelists resolves part paths)."""
    return read_filelist(filelist)


def read_latent_file_list(file_list: str) -> List[LatentSource]:
    """The sources of a .filelist.list whose every filelist is a latent dataset; a filelist of image parts (or
    without a manifest) is an error naming it: a list never mixes latents and images."""
    out = []
    for src in read_filelist_list(file_list):
        manifest = latent_manifest_of(src.filelist)
        if manifest is None:
            raise ValueError(f"{file_list}: {src.filelist} is not a latent dataset (no {LATENT_FORMAT} manifest "
                             "beside it): precompute it with precompute_latents.py, or train from images")
        out.append(LatentSource(src.filelist, src.weight, src.parts, manifest))
    return out


# ----------------------------------------------------------------------------------------------- compatibility
def folder_fingerprint(folder: str, weights: bool) -> dict:
    """What a component's output depends on: its config.json and the sha256 of its weight files (weights=True),
    or of every file (a tokenizer)."""
    from sd.components import read_config, weight_digests

    if weights:
        return {"config": read_config(os.path.join(folder, "config.json")), "weights_sha256": weight_digests(folder)}
    return {"files_sha256": {n: sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
                             if os.path.isfile(os.path.join(folder, n))}}


def _differs(what: str, cached: dict, here: dict, flag: str, path: str) -> List[str]:
    keys = sorted(k for k in set(cached) | set(here) if cached.get(k) != here.get(k))
    if not keys:
        return []
    return [f"{what} differs from the one the latents were made with ({', '.join(map(str, keys[:4]))}): {flag} "
            f"{path}"]


def check_compatible(manifest: dict, vae_dir: str, text_encoder_dir: Optional[str], tokenizer_dir: str,
                     resolution: int, scaling_factor: float, *, model_max_length: int,
                     center_crop: bool = True, random_flip: bool = False, interpolation: Optional[str] = None,
                     train_text_encoder: bool = False) -> List[str]:
    """Why a training run cannot use this latent dataset, one line each ([] when it can). The folders are those
    the run resolved (sd/components.py); the values its own flags."""
    dep, problems = manifest["dependencies"], []
    vae = folder_fingerprint(vae_dir, weights=True)
    problems += _differs("the VAE config", dep["vae"]["config"], vae["config"], "--vae_name_or_path", vae_dir)
    problems += _differs("the VAE weights", dep["vae"]["weights_sha256"], vae["weights_sha256"],
                         "--vae_name_or_path", vae_dir)
    if float(dep["scaling_factor"]) != float(scaling_factor):
        problems.append(f"scaling_factor {scaling_factor} != {dep['scaling_factor']} of the latents")
    if int(dep["resolution"]) != int(resolution):
        problems.append(f"--resolution {resolution} != {dep['resolution']} of the latents")
    if not center_crop:
        problems.append("--center_crop False: the latents are of the center crop (a random crop cannot be "
                        "cached); train with --center_crop True")
    if random_flip and not dep["random_flip"]:
        problems.append("--random_flip: the latents hold no mirrored moments; precompute with --random_flip")
    if interpolation is not None and interpolation != dep["interpolation"]:
        problems.append(f"--interpolation {interpolation} != {dep['interpolation']} of the latents")
    tok = folder_fingerprint(tokenizer_dir, weights=False)
    problems += _differs("the tokenizer", dep["tokenizer"]["files_sha256"], tok["files_sha256"],
                         "--tokenizer_name", tokenizer_dir)
    if int(dep["model_max_length"]) != int(model_max_length):
        problems.append(f"--model_max_length {model_max_length} != {dep['model_max_length']} of the latents")
    if dep["text_embeddings"]:
        if train_text_encoder:
            problems.append("--train_text_encoder: the latents hold cached text embeddings of a frozen encoder; "
                            "precompute with --text_embeddings False to train it")
        if text_encoder_dir is None:
            problems.append("the latents hold text embeddings but no text encoder was given to compare")
        else:
            te = folder_fingerprint(text_encoder_dir, weights=True)
            problems += _differs("the text encoder config", dep["text_encoder"]["config"], te["config"],
                                 "--text_encoder_name_or_path", text_encoder_dir)
            problems += _differs("the text encoder weights", dep["text_encoder"]["weights_sha256"],
                                 te["weights_sha256"], "--text_encoder_name_or_path", text_encoder_dir)
    return problems
