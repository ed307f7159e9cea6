"""Prompt-set evaluation during training: every --eval_steps, every rank draws its own slice of --eval_prompts,
scores it, and the ranks add up their sums; rank 0 logs the scores to VisualDL and the training log.

Why every rank samples: with rank 0 sampling alone, the other ranks wait in the next collective for as long as
sampling takes, and NCCL's timeout ends the job (the report behind this module). Here the slices are
sd/eval/distributed.share of the prompt list (balanced to one prompt), so the ranks reach the one all_reduce
together; image i is drawn from image_seed(--seed, i, 0) whatever the number of ranks, so scores do not depend on
the job's layout (up to float summation order).

What is scored (decided once, at start, by `plan_eval`; at least one must apply):
- clip:      --clip_model: CLIP score (torchmetrics' 0-100 convention) and the mean cosine (MLPerf's, bar 0.15);
- fid:       --inception_weights with --eval_reference_stats: FID of the images drawn so far against the
             reference statistics (sd/eval/fid.py; KID needs features of both sides and is left to eval.py score);
- adherence: when every prompt is a demo caption (sd/tiny/make_demo_data.caption_for), the accuracy of color,
             shape and position read back from the images (sd/eval/adherence.py), as the quickstart's target.
Per rank only sums and counts leave: CLIP sums, adherence hits, and the feature moments (count, sum, sum of outer
products), which add up exactly to the statistics of all images. The training RNG is restored afterwards, and the
EMA weights are sampled when --use_ema, as the image logging does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback

from sd.eval import fid, sampling
from sd.eval.adherence import ATTRIBUTES, combination_order
from sd.eval.args import SamplingArguments
from sd.eval.distributed import share
from sd.eval.evaluation import read_prompts, sample_images
from sd.tiny.make_demo_data import caption_for

logger = logging.getLogger("sd")

ADHERENCE_KEYS = (*ATTRIBUTES, "all")
# Packed per-rank sums: images, CLIP (score sum, cosine sum, pairs), adherence (images, hits per key), features.
HEAD = ("images", "clip_score_sum", "clip_cosine_sum", "clip_pairs", "adherence_images",
        *(f"adherence_{k}_hits" for k in ADHERENCE_KEYS))


@dataclass(frozen=True)
class EvalPlan:
    """What every --eval_steps evaluation draws and scores; read and checked at start (train.py)."""

    prompts: Tuple[str, ...]
    metrics: Tuple[str, ...]  # of "clip", "fid", "adherence"
    targets: Optional[Tuple[Tuple[str, str, str], ...]]  # the demo attributes of each prompt (adherence)


def demo_targets(prompts: Sequence[str]) -> Optional[Tuple[Tuple[str, str, str], ...]]:
    """Each prompt's (color, shape, position) when every prompt is a demo caption, else None."""
    known = {caption_for(*c): c for c in combination_order()}
    return tuple(known[p] for p in prompts) if all(p in known for p in prompts) else None


def plan_eval(training) -> Optional[EvalPlan]:
    """None without --eval_prompts; otherwise the prompts and metrics, every file checked (nothing loads)."""
    if not training.eval_prompts:
        return None
    prompts, skipped = read_prompts(training.eval_prompts, training.eval_prompt_column)
    if sum(skipped.values()):
        logger.warning("--eval_prompts %s: skipped %s", training.eval_prompts, skipped)
    metrics = []
    if training.clip_model:
        from sd.eval.clip_score import check_clip_folder

        check_clip_folder(training.clip_model)
        metrics.append("clip")
    if training.inception_weights:
        from sd.eval.inception import FEATURE_DIM, read_weights_header

        divisor, _ = read_weights_header(training.inception_weights)
        fid.load_stats(training.eval_reference_stats, FEATURE_DIM // divisor, with_features=False)
        metrics.append("fid")
    targets = demo_targets(prompts)
    if targets is not None:
        metrics.append("adherence")
    if not metrics:
        raise ValueError(f"--eval_prompts {training.eval_prompts}: nothing to score: pass --clip_model (CLIP score) "
                         "and/or --inception_weights with --eval_reference_stats (FID); demo captions alone are "
                         "scored for adherence")
    return EvalPlan(tuple(prompts), tuple(metrics), targets)


def pack(head: Dict[str, float], moments: Optional[fid.Moments]) -> np.ndarray:
    """One float64 vector of a rank's sums (the all_reduce payload)."""
    parts = [np.array([head.get(k, 0.0) for k in HEAD], np.float64)]
    if moments is not None:
        parts += [np.array([moments.count], np.float64), moments.total, moments.outer.ravel()]
    return np.concatenate(parts)


def unpack(vector: np.ndarray, dim: Optional[int]) -> Tuple[Dict[str, float], Optional[fid.Moments]]:
    head = dict(zip(HEAD, vector[:len(HEAD)].tolist()))
    if dim is None:
        return head, None
    rest = vector[len(HEAD):]
    return head, fid.Moments(int(round(rest[0])), rest[1:1 + dim].copy(), rest[1 + dim:].reshape(dim, dim).copy())


def scores_of(head: Dict[str, float], moments: Optional[fid.Moments], reference: Optional[dict]) -> Dict[str, float]:
    """The job's scores from its summed vector."""
    out = {"images": head["images"]}
    if head["clip_pairs"]:
        out["clip_score"] = head["clip_score_sum"] / head["clip_pairs"]
        out["clip_cosine"] = head["clip_cosine_sum"] / head["clip_pairs"]
    if head["adherence_images"]:
        for k in ADHERENCE_KEYS:
            out[f"adherence_{k}"] = head[f"adherence_{k}_hits"] / head["adherence_images"]
    if moments is not None and reference is not None and moments.count >= 2:
        mu, sigma = moments.statistics()
        out["fid"] = fid.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    return out


class PromptSetEvalCallback(TrainerCallback):
    """Every `training.eval_steps`: draw this rank's slice of the plan's prompts, score, sum over ranks, log."""

    def __init__(self, plan: EvalPlan, tokenizer, resolution: int, training, visualdl=None):
        import paddle.distributed as dist

        self.plan, self.tokenizer, self.resolution, self.visualdl = plan, tokenizer, resolution, visualdl
        self.every, self.seed = training.eval_steps, training.seed
        self.sampling = SamplingArguments(scheduler="ddim", num_inference_steps=training.eval_num_inference_steps,
                                          guidance_scales=[training.eval_guidance_scale], seed=training.seed,
                                          batch_size=training.per_device_eval_batch_size, output_dir=None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.indices = share(list(range(len(plan.prompts))), self.rank, self.world)
        self.inception = self.reference = self.clip = None
        if "fid" in plan.metrics:
            from sd.eval.inception import load_inception

            self.inception = load_inception(training.inception_weights)
            self.reference = fid.load_stats(training.eval_reference_stats, self.inception.feature_dim,
                                            with_features=False)
        if "clip" in plan.metrics:
            from sd.eval.clip_score import ClipScorer

            self.clip = ClipScorer(training.clip_model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.every or state.global_step % self.every:
            return
        rng = paddle.get_rng_state()
        try:
            self.evaluate(state, model)
        finally:
            paddle.set_rng_state(rng)

    @paddle.no_grad()
    def draw(self, model):
        """This rank's images, sampled with the EMA weights when there are any, every module back in its mode."""
        g = self.sampling.guidance_scales[0]
        training = [m for m in (model.unet, model.text_encoder) if m.training]
        for m in training:
            m.eval()
        try:
            with model.ema_scope():
                pipe = sampling.make_pipeline(model.vae, model.text_encoder, self.tokenizer, model.unet,
                                              sampling.make_scheduler("ddim", model.noise_scheduler.config))
                per_prompt = sample_images(pipe, [self.plan.prompts[i] for i in self.indices], self.indices,
                                           self.sampling, g, self.resolution, self.resolution)
        finally:
            for m in training:
                m.train()
        return [np.asarray(images[0].convert("RGB")) for images in per_prompt]

    def local_sums(self, images) -> np.ndarray:
        head: Dict[str, float] = {"images": len(images)}
        if self.clip is not None and images:
            from sd.eval.clip_score import clip_sums

            cos = self.clip.cosines(images, [self.plan.prompts[i] for i in self.indices])
            head["clip_score_sum"], head["clip_cosine_sum"], head["clip_pairs"] = clip_sums(cos)
        if self.plan.targets is not None:
            from sd.tiny.demo_attributes import read_attributes

            head["adherence_images"] = len(images)
            for i, image in zip(self.indices, images):
                target, read = dict(zip(ATTRIBUTES, self.plan.targets[i])), read_attributes(image)
                hits = {a: read[a] == target[a] for a in ATTRIBUTES}
                hits["all"] = all(hits.values())
                for k in ADHERENCE_KEYS:
                    head[f"adherence_{k}_hits"] = head.get(f"adherence_{k}_hits", 0.0) + float(hits[k])
        moments = None
        if self.inception is not None:
            from sd.eval.inception import inception_features

            moments = fid.Moments.empty(self.inception.feature_dim)
            if images:
                moments.add(inception_features(self.inception, images, "bilinear", self.sampling.batch_size))
        return pack(head, moments)

    def evaluate(self, state, model) -> Dict[str, float]:
        t0 = time.time()
        vector = self.local_sums(self.draw(model))
        if self.world > 1:  # every rank arrives here after drawing its own, equal-sized slice
            import paddle.distributed as dist

            summed = paddle.to_tensor(vector)
            dist.all_reduce(summed)
            vector = summed.numpy()
        head, moments = unpack(vector, self.inception.feature_dim if self.inception is not None else None)
        scores = scores_of(head, moments, self.reference)
        if self.rank == 0:
            self.log(state, scores, time.time() - t0)
        return scores

    def log(self, state, scores: Dict[str, float], seconds: float) -> None:
        step = state.global_step
        logger.info("eval at step %d: %d prompts on %d rank(s) in %.1f s: %s", step, int(scores["images"]),
                    self.world, seconds, ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "images"))
        state.log_history.append({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        writer = self.visualdl.vdl_writer if self.visualdl is not None else None
        if writer is not None:
            for k, v in scores.items():
                if k != "images":
                    writer.add_scalar(tag=f"eval/{k}", value=float(v), step=step)
