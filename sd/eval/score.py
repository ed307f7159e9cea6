"""`eval.py score`: FID and KID of generated images against a reference, and their CLIP score against their prompts.

    python eval.py score --images outputs/coco --reference coco_val_stats.npz \
        --inception_weights weights/pt_inception-2015-12-05.safetensors --clip_model ./clip-vit-large-patch14
    python eval.py score --reference /data/coco2014_val_256 --inception_weights ... --save_stats coco_val_stats.npz

--images: a generate run's output_dir (its index.json gives each image's prompt, and one score per guidance
scale) or any folder of images (FID/KID only: no prompts). --reference: a folder of images or a statistics .npz
(sd/eval/fid.py owns the format; --save_stats writes one from a reference folder, once). Features: Inception-v3
pool3 (sd/eval/inception.py) after --resize bilinear (pytorch-fid, MLPerf) or clean (clean-fid). CLIP:
sd/eval/clip_score.py. Folders are read flat (no subfolders), images one batch at a time; an unreadable image is
skipped and counted. Everything runs in one process. Scores and the resolved configuration go to
--output (default IMAGES/scores.json, or beside --save_stats).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from data_tools.fileio import write_json_atomic
from sd.eval import fid
from sd.eval.args import DEVICE_PATTERN
from sd.eval.evaluation import IMAGE_SUFFIXES
from sd.eval.inception import RESIZE_MODES

logger = logging.getLogger("sd.eval")

SCORES_NAME = "scores.json"
INDEX_NAME = "index.json"  # what sd/eval/generation.py writes


@dataclass(frozen=True)
class ScoreArguments:
    _argument_group_name = "score"

    images: Optional[str] = field(default=None, metadata={
        "help": "generated images: a generate output_dir with index.json (prompts, guidance groups) or a folder"})
    reference: Optional[str] = field(default=None, metadata={
        "help": "real images: a folder, or a statistics .npz written by --save_stats"})
    save_stats: Optional[str] = field(default=None, metadata={
        "help": "write the --reference folder's statistics (mu, sigma, features for KID) to this .npz"})
    inception_weights: Optional[str] = field(default=None, metadata={
        "help": "FID Inception-v3 weights (.safetensors from scripts/convert_inception_weights.py)"})
    clip_model: Optional[str] = field(default=None, metadata={
        "help": "a local CLIP model folder (Hugging Face layout, safetensors) for the CLIP score"})
    resize: str = field(default="bilinear", metadata={
        "choices": list(RESIZE_MODES), "help": "bilinear: pytorch-fid / MLPerf; clean: clean-fid's PIL bicubic"})
    kid_subsets: int = field(default=100, metadata={"help": "KID: number of random subsets"})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID: largest subset size"})
    seed: int = field(default=0, metadata={"help": "seed of the KID subsets"})
    batch_size: int = field(default=32, metadata={"help": "images per network call"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, gpu or gpu:N (None: gpu when visible)"})
    output: Optional[str] = field(default=None, metadata={"help": "scores .json (default IMAGES/scores.json)"})

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"--resize must be one of {list(RESIZE_MODES)}, got {self.resize!r}")
        if self.device is not None and not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"--device must be cpu, gpu or gpu:N, got {self.device!r}")
        for name, low in (("kid_subsets", 1), ("kid_subset_size", 2), ("batch_size", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.save_stats is not None and not self.save_stats.endswith(".npz"):
            raise ValueError(f"--save_stats {self.save_stats}: the statistics file must end in .npz")
        if self.save_stats is not None and (self.reference is None or self.reference.endswith(".npz")):
            raise ValueError("--save_stats needs --reference FOLDER (the real images to summarise)")
        if self.reference is not None and self.inception_weights is None:
            raise ValueError("--reference (FID, KID) needs --inception_weights (nothing is downloaded)")
        if self.clip_model is not None and self.images is None:
            raise ValueError("--clip_model scores --images against their prompts: pass --images")
        if self.images is not None and self.reference is None and self.clip_model is None:
            raise ValueError("nothing to score: pass --reference with --inception_weights (FID, KID) and/or "
                             "--clip_model (CLIP score)")
        if self.images is None and self.save_stats is None:
            raise ValueError("pass --images (to score) or --reference FOLDER --save_stats FILE.npz (to summarise)")


@dataclass(frozen=True)
class ScoreConfig:
    """What a score run runs: the arguments, the resolved device and output file, the image groups."""

    command: str
    args: ScoreArguments
    device: str
    output: str
    groups: Tuple[Tuple[str, Optional[float], int], ...]  # (name, guidance or None, number of images)
    notices: Tuple[str, ...] = ()


def list_images(folder: str, flag: str) -> List[str]:
    """The image files directly in a folder, sorted; none is an error naming the flag."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag}: no such folder: {folder}")
    names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ValueError(f"{flag} {folder}: no image files in it (subfolders are not read: pass a generate "
                         "output_dir with its index.json, or the folder that holds the images)")
    return [os.path.join(folder, n) for n in names]


def image_groups(folder: str) -> List[Tuple[str, Optional[float], List[str], List[Optional[str]]]]:
    """[(name, guidance, image paths, prompts)]: one group per guidance scale of a generate run's index.json, or
    the folder's images as one group without prompts."""
    index = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(index):
        paths = list_images(folder, "--images")
        return [(os.path.basename(os.path.normpath(folder)), None, paths, [None] * len(paths))]
    try:
        with open(index, encoding="utf-8") as f:
            entries = json.load(f)
        groups: Dict[float, Tuple[List[str], List[str]]] = {}
        for e in entries:
            paths, prompts = groups.setdefault(float(e["guidance"]), ([], []))
            paths.append(os.path.join(folder, e["file"]))
            prompts.append(str(e["prompt"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not an index written by eval.py ({e})") from None
    if not groups:
        raise ValueError(f"{index}: no entries")
    return [(f"g{g:g}", g, paths, prompts) for g, (paths, prompts) in groups.items()]


def resolve(args: ScoreArguments, world: int = 1) -> ScoreConfig:
    """Every path checked (nothing loads): a missing file or folder is one line naming its flag."""
    from sd.eval.args import resolve_device
    from sd.device import DeviceFacts

    if world > 1:
        raise ValueError("eval.py score runs in one process: start it without paddle.distributed.launch")
    if args.inception_weights is not None:
        from sd.eval.inception import read_weights_header

        read_weights_header(args.inception_weights)
    if args.clip_model is not None:
        from sd.eval.clip_score import check_clip_folder

        check_clip_folder(args.clip_model)
    if args.reference is not None:
        if args.reference.endswith(".npz"):
            if not os.path.isfile(args.reference):
                raise FileNotFoundError(f"--reference: no such statistics file: {args.reference}")
        else:
            list_images(args.reference, "--reference")
    groups = image_groups(args.images) if args.images is not None else []
    if args.clip_model is not None and groups and groups[0][1] is None:
        raise ValueError(f"--clip_model: {args.images} has no {INDEX_NAME}, so no prompts to score against")
    output = args.output or (os.path.join(args.images, SCORES_NAME) if args.images
                             else os.path.splitext(args.save_stats)[0] + ".json")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"--output {output}: its folder does not exist")
    facts = DeviceFacts.detect()
    device, notices = resolve_device(args.device, facts, _gpu_count(facts))
    return ScoreConfig("score", args, device, output,
                       tuple((name, g, len(paths)) for name, g, paths, _ in groups), tuple(notices))


def _gpu_count(facts) -> int:
    import paddle

    return paddle.device.cuda.device_count() if facts.cuda else 0


def read_rgb(path: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 HWC RGB pixels, None) or (None, why it was skipped)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable: {type(e).__name__}"


def batches(paths: Sequence[str], size: int, skipped: Counter) -> Iterator[Tuple[List[int], List[np.ndarray]]]:
    """(positions, pixels) of the readable images, `size` paths at a time; the rest counted in `skipped`."""
    for start in range(0, len(paths), size):
        keep, pixels = [], []
        for j, path in enumerate(paths[start:start + size], start):
            image, why = read_rgb(path)
            if image is None:
                skipped[why] += 1
                logger.warning("skipped %s: %s", path, why)
                continue
            keep.append(j)
            pixels.append(image)
        if keep:
            yield keep, pixels


def measure(paths: Sequence[str], prompts: Sequence[Optional[str]], args: ScoreArguments, inception, clip):
    """(features [n, d] or None, CLIP cosines or None, skipped counts) of one set of images."""
    from sd.eval.inception import inception_features

    skipped: Counter = Counter()
    feats, cosines = [], []
    for keep, pixels in batches(paths, args.batch_size, skipped):
        if inception is not None:
            feats.append(inception_features(inception, pixels, args.resize, args.batch_size))
        if clip is not None and prompts[0] is not None:
            cosines.append(clip.cosines(pixels, [prompts[j] for j in keep], args.batch_size))
    features = np.concatenate(feats) if feats else None
    return features, (np.concatenate(cosines) if cosines else None), dict(skipped)


def reference_statistics(args: ScoreArguments, inception) -> Tuple[dict, dict]:
    """(arrays of the reference: mu, sigma, features when known; a summary for scores.json)."""
    if args.reference.endswith(".npz"):
        arrays = fid.load_stats(args.reference, inception.feature_dim)
        return arrays, {"source": args.reference, "num_images": int(arrays["num_images"]),
                        "kid": "features" in arrays}
    paths = list_images(args.reference, "--reference")
    features, _, skipped = measure(paths, [None] * len(paths), args, inception, None)
    if features is None or len(features) < 2:
        raise ValueError(f"--reference {args.reference}: fewer than 2 readable images (skipped: {skipped})")
    if args.save_stats is not None:
        fid.save_stats(args.save_stats, features)
        logger.info("reference statistics of %d images written to %s", len(features), args.save_stats)
    mu, sigma = fid.feature_statistics(features)
    return ({"mu": mu, "sigma": sigma, "features": features, "num_images": len(features)},
            {"source": args.reference, "num_images": len(features), "skipped": skipped,
             "saved_stats": args.save_stats, "kid": True})


def run_score(config: ScoreConfig) -> dict:
    """Load the networks asked for, measure, write and return the scores."""
    import paddle

    from sd.config import to_jsonable

    args = config.args
    paddle.set_device(config.device)
    inception = clip = None
    if args.inception_weights is not None:
        from sd.eval.inception import load_inception

        inception = load_inception(args.inception_weights)
    if args.clip_model is not None:
        from sd.eval.clip_score import ClipScorer

        clip = ClipScorer(args.clip_model)
    reference, summary = reference_statistics(args, inception) if args.reference is not None else (None, None)
    rows = []
    for name, guidance, paths, prompts in (image_groups(args.images) if args.images else []):
        features, cosines, skipped = measure(paths, prompts, args, inception if reference else None, clip)
        row = {"name": name, "guidance": guidance, "num_images": len(paths) - sum(skipped.values()),
               "skipped": skipped}
        if reference is not None and features is not None:
            row.update(fid_and_kid(features, reference, args))
        if cosines is not None:
            from sd.eval.clip_score import clip_means, clip_sums

            row.update(clip_means(*clip_sums(cosines)))
        rows.append(row)
    result = {"config": to_jsonable(config), "reference": summary, "groups": rows}
    write_json_atomic(config.output, result)
    return result


def fid_and_kid(features: np.ndarray, reference: dict, args: ScoreArguments) -> dict:
    mu, sigma = fid.feature_statistics(features)
    out = {"fid": fid.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])}
    if reference.get("features") is not None:
        out["kid_mean"], out["kid_std"] = fid.kernel_inception_distance(
            features, reference["features"], args.kid_subsets, args.kid_subset_size, args.seed)
    return out


def format_scores(result: dict) -> str:
    cols = ("fid", "kid_mean", "clip_score", "clip_cosine")
    lines = [f"{'group':<12}{'images':>8}" + "".join(f"{c:>13}" for c in cols)]
    for row in result["groups"]:
        cells = "".join(f"{row[c]:>13.4f}" if c in row else f"{'-':>13}" for c in cols)
        lines.append(f"{row['name']:<12}{row['num_images']:>8}" + cells)
    return "\n".join(lines)

