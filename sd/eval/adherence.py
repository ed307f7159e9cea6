"""Caption adherence on the demo dataset: does the model draw the color, shape and position its prompt asks for?

For each attribute combination of the demo captions (data_tools/make_demo_data.caption_for over COLORS x SHAPES x
POSITIONS, or a balanced subset) K images are generated at every guidance scale and read back with
data_tools/demo_attributes.read_attributes; the accuracy of each attribute is reported next to its chance level.
Image k of combination i uses the same initial latents at every guidance scale (sd/eval/evaluation.image_seed), so
the guidance comparison is paired: only the guidance differs.

    python eval.py adherence --model_dir sd/tiny_init --unet_path runs/tiny/unet --output_dir outputs/adherence

From Python, with a loaded pipeline (e.g. sd/eval/evaluation.load_pipeline):

    measure_adherence(pipe, AdherenceSamplingArguments(output_dir=None), AdherenceArguments(max_combinations=30))
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from data_tools.fileio import write_json_atomic
from sd.eval import sampling
from sd.eval.args import AdherenceArguments, SamplingArguments, resolve_size
from sd.eval.evaluation import guidance_folder, image_seed, sample_images
from sd.images import grid
from sd.tiny.demo_attributes import read_attributes
from sd.tiny.make_demo_data import COLORS, POSITIONS, SHAPES, caption_for

logger = logging.getLogger("sd.eval")

ATTRIBUTES: Tuple[str, ...] = ("color", "shape", "position")
ADHERENCE_NAME = "adherence.json"
Combination = Tuple[str, str, str]


def attribute_values() -> Dict[str, List[str]]:
    return {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}


def chance_levels() -> Dict[str, float]:
    """Accuracy of a uniform guess per attribute, and of guessing all three at once."""
    values = attribute_values()
    chance = {a: 1.0 / len(values[a]) for a in ATTRIBUTES}
    chance["all"] = chance["color"] * chance["shape"] * chance["position"]
    return chance


def combination_order() -> List[Combination]:
    """All combinations, ordered so that every prefix is as balanced as possible in each attribute: the first 6 have
    6 distinct colors, the first 3 distinct shapes, the first 5 distinct positions, and so on. A --max_combinations
    subset is a prefix, so a small subset still measures every attribute value instead of, say, only reds."""
    values = attribute_values()
    remaining = list(itertools.product(*(values[a] for a in ATTRIBUTES)))
    counts = {a: Counter() for a in ATTRIBUTES}
    order: List[Combination] = []
    while remaining:
        # Most under-represented values first: counts normalised by the number of values of each attribute.
        # min() keeps the first of equal keys, so ties go to product order and the result is deterministic.
        best = min(remaining, key=lambda c: sum(counts[a][v] * len(values[a]) for a, v in zip(ATTRIBUTES, c)))
        remaining.remove(best)
        order.append(best)
        for a, v in zip(ATTRIBUTES, best):
            counts[a][v] += 1
    return order


def select_combinations(max_combinations: Optional[int]) -> List[Combination]:
    """The first max_combinations of combination_order() (all of them for None); the range is checked by
    AdherenceArguments."""
    return combination_order()[:max_combinations]


def scheduler_name(pipe) -> str:
    """The eval.py --scheduler name of the pipeline's scheduler (sampling.SCHEDULERS is keyed by name)."""
    for name, (cls, _) in sampling.SCHEDULERS.items():
        if type(pipe.scheduler) is cls:
            return name
    raise ValueError(f"pipeline scheduler {type(pipe.scheduler).__name__} is not one of eval.py's "
                     f"{sorted(sampling.SCHEDULERS)}: build it with sampling.make_scheduler")


def measure_adherence(pipe, sampling_args: SamplingArguments, adherence: AdherenceArguments) -> dict:
    """Accuracies per attribute and guidance scale. With sampling_args.output_dir, also writes adherence.json and
    one grid per guidance (combinations in order, row-major, each as K adjacent images); output_dir None writes
    nothing. Returns the same dict as adherence.json:
    {"settings", "chance": {attr: p}, "by_guidance": [{"guidance", "num_images", "accuracy": {attr: p},
    "per_value": {attr: {value: p}}}], "records": [one per image: prompt, target, read, seed, guidance]}
    where attr is color | shape | position | all."""
    if scheduler_name(pipe) != sampling_args.scheduler:
        raise ValueError(f"the pipeline samples with {scheduler_name(pipe)} but --scheduler is "
                         f"{sampling_args.scheduler}: build it with sampling.make_scheduler")
    k, out = adherence.num_per_combination, sampling_args.output_dir
    combos = select_combinations(adherence.max_combinations)
    height, width = resolve_size(pipe.vae.config, pipe.unet.config, sampling_args.height, sampling_args.width)
    prompts = [caption_for(*c) for c in combos]
    if out is not None:
        os.makedirs(out, exist_ok=True)
    # Whole combinations per grid row (K images side by side), about as many rows as columns.
    grid_cols = k * max(1, round(math.sqrt(len(combos) / k)))
    records: List[dict] = []
    by_guidance: List[dict] = []
    for guidance in sampling_args.guidance_scales:
        images = sample_images(pipe, prompts, list(range(len(prompts))), sampling_args, guidance, height, width, k)
        rows = read_back(combos, images, guidance, sampling_args.seed)
        by_guidance.append(score_readings(guidance, rows))
        records.extend(rows)
        if out is not None:
            flat = [im for per_prompt in images for im in per_prompt]
            grid(flat, grid_cols).save(os.path.join(out, f"adherence_{guidance_folder(guidance)}.png"))
        logger.info("guidance %g: %s", guidance, by_guidance[-1]["accuracy"])
    result = {"settings": {"num_combinations": len(combos), "num_per_combination": k,
                           "max_combinations": adherence.max_combinations, "seed": sampling_args.seed,
                           "scheduler": sampling_args.scheduler,
                           "num_inference_steps": sampling_args.num_inference_steps, "height": height,
                           "width": width, "guidance_scales": list(sampling_args.guidance_scales),
                           "grid_columns": grid_cols},
              "chance": chance_levels(), "by_guidance": by_guidance, "records": records}
    if out is not None:
        write_json_atomic(os.path.join(out, ADHERENCE_NAME), result)
    return result


def read_back(combos: Sequence[Combination], images: Sequence[Sequence], guidance: float, seed: int) -> List[dict]:
    """One record per image: what its prompt asked for (target) and what read_attributes sees (read)."""
    if len(combos) != len(images):
        raise ValueError(f"{len(combos)} combinations but images for {len(images)}")
    rows = []
    for i, (combo, per_prompt) in enumerate(zip(combos, images)):
        target = dict(zip(ATTRIBUTES, combo))
        for k, image in enumerate(per_prompt):
            rows.append({"guidance": guidance, "prompt": caption_for(*combo), "combination_index": i,
                         "image_index": k, "seed": image_seed(seed, i, k), "target": target,
                         "read": read_attributes(image)})
    return rows


def score_readings(guidance: float, rows: Sequence[dict]) -> dict:
    """Accuracy per attribute (and of all three at once) and per asked-for value, over read_back records."""
    if not rows:
        raise ValueError("no images to score")
    values = attribute_values()
    hits = {a: sum(r["read"][a] == r["target"][a] for r in rows) for a in ATTRIBUTES}
    hits["all"] = sum(all(r["read"][a] == r["target"][a] for a in ATTRIBUTES) for r in rows)
    per_value = {}
    for a in ATTRIBUTES:
        per_value[a] = {}
        for v in values[a]:
            asked = [r for r in rows if r["target"][a] == v]
            if asked:  # a small subset may not ask for every value; absent values are left out, not scored 0
                per_value[a][v] = sum(r["read"][a] == v for r in asked) / len(asked)
    return {"guidance": guidance, "num_images": len(rows),
            "accuracy": {a: hits[a] / len(rows) for a in (*ATTRIBUTES, "all")}, "per_value": per_value}


def format_table(result: dict) -> str:
    """Accuracy per attribute and guidance, with the chance row underneath."""
    cols = (*ATTRIBUTES, "all")
    lines = ["guidance  " + "".join(f"{c:>10}" for c in cols) + "    images"]
    for row in result["by_guidance"]:
        acc = row["accuracy"]
        lines.append(f"{row['guidance']:<8g}  " + "".join(f"{acc[c]:>10.3f}" for c in cols)
                     + f"{row['num_images']:>10d}")
    lines.append("chance    " + "".join(f"{result['chance'][c]:>10.3f}" for c in cols))
    return "\n".join(lines)
