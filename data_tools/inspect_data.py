"""Look at what training will see: draw samples through the training dataset class and write them out.

    python data_tools/inspect_data.py --file_list F --output_dir D [--num_samples 16] [--resolution 512] \
        [--data_format laion400m|laion_aes] [--caption_dropout_prob 0.1] [--seed 42] [--tokenizer PATH] ...

The data flags are training's own (trainer/loader/config.py DataArguments, with training's defaults: 512 px,
random crop, no flip, caption dropout 0.1), so the same flags show what train.py would read; the rest
(InspectArguments) are inspect's. Writes D/grid.png (the de-normalised training crops, row-major in sample
order), D/samples.jsonl (one line per sample, same order: caption as trained, raw caption, source filelist,
part path, 1-based line, epoch, and input_ids when a tokenizer is given) and D/inspect_config.json (the
resolved config), then prints the skip counters as JSON. Batch size 1 and a single in-process worker (logical
worker 0 of rank 0), so the samples are the first ones rank 0's first worker would train on with the same flags.
The first line printed describes the sources, including where each filelist and its parts were found (the list's
own folder, the working folder, or absolute paths). A latent dataset's --file_list (precompute_latents.py) needs
--pretrained_model_name_or_path or --vae_name_or_path: its samples' cached posterior means are decoded through that
VAE (checked against the manifest's sha256) into grid.png, and samples.jsonl names the shard ("part"), the image
part's line, the flip and the cached input_ids. A stream that cannot yield (too many bad records in a row)
ends with its one-line reason on stderr and exit status 1, as training would.

With --aspect_ratio_buckets the samples come in batches of --batch_size from one bucket each, in the order rank
0's first worker would emit them at that batch size (train.py's --per_device_train_batch_size): samples.jsonl
gives each sample's bucket ("WxH"), one grid per bucket is written (grid_WxH.png, the bucket's samples in sample
order) instead of grid.png, and the samples drawn per bucket are printed as JSON ("samples per bucket: {...}").
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from data_tools.fileio import write_text_atomic
from sd.components import tokenizer_max_length
from sd.config import parse_args, save_config
from sd.images import grid, to_uint8
from trainer.loader.buckets import bucket_name
from trainer.loader.config import DataArguments

CONFIG_NAME = "inspect_config.json"


@dataclass(frozen=True)
class InspectArguments:
    output_dir: str = field(metadata={"help": "Where grid.png, samples.jsonl and inspect_config.json are written."})
    num_samples: int = field(default=16, metadata={"help": "Samples to draw."})
    seed: int = field(default=42, metadata={"help": "The training seed to reproduce (train.py's --seed)."})
    tokenizer: Optional[str] = field(
        default=None, metadata={"help": "A CLIPTokenizer folder; adds input_ids to samples.jsonl."})
    model_max_length: Optional[int] = field(
        default=None, metadata={"help": "Tokenizer padding/truncation length (default: the tokenizer's own, as in "
                                "training)."})
    batch_size: int = field(
        default=1, metadata={"help": "Samples per batch (train.py's --per_device_train_batch_size): with "
                                     "--aspect_ratio_buckets, each batch is one bucket's, so it sets the order."})
    pretrained_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A latent dataset's --file_list only: the init or pipeline folder whose "
                                        "vae/ decodes the cached latents into grid.png."})
    vae_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A latent dataset's --file_list only: the AutoencoderKL folder that "
                                        "decodes the cached latents (wins over --pretrained_model_name_or_path)."})

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.model_max_length is not None and self.model_max_length < 2:
            raise ValueError(f"--model_max_length must be >= 2, got {self.model_max_length}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise FileNotFoundError(f"--tokenizer: no such folder: {self.tokenizer}")
        for flag, path in (("--pretrained_model_name_or_path", self.pretrained_model_name_or_path),
                           ("--vae_name_or_path", self.vae_name_or_path)):
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"{flag}: no such folder: {path}")

    def vae_folder(self) -> Optional[str]:
        if self.vae_name_or_path:
            return self.vae_name_or_path
        return os.path.join(self.pretrained_model_name_or_path, "vae") if self.pretrained_model_name_or_path else None


@dataclass(frozen=True)
class InspectRun:
    """The resolved config: the parsed arguments as given plus the absolute paths they name. What runs and what
    inspect_config.json holds."""

    data: DataArguments
    inspect: InspectArguments
    file_list: str
    output_dir: str
    tokenizer: Optional[str]
    vae: Optional[str] = None  # decodes a latent dataset's samples


def resolve(data: DataArguments, inspect: InspectArguments) -> InspectRun:
    vae = inspect.vae_folder()
    if vae is not None and not os.path.isfile(os.path.join(vae, "config.json")):
        raise FileNotFoundError(f"--vae_name_or_path / --pretrained_model_name_or_path: no AutoencoderKL at {vae} "
                                "(no config.json)")
    if inspect.tokenizer is not None and inspect.model_max_length is None:
        inspect = dataclasses.replace(inspect, model_max_length=tokenizer_max_length(inspect.tokenizer))
    return InspectRun(data, inspect, file_list=os.path.abspath(data.file_list),
                      output_dir=os.path.abspath(inspect.output_dir),
                      tokenizer=os.path.abspath(inspect.tokenizer) if inspect.tokenizer else None,
                      vae=os.path.abspath(vae) if vae else None)


def decode_latents(run: InspectRun, manifest: dict, means: np.ndarray) -> np.ndarray:
    """The cached posterior means [N, C, h, w] through the VAE they were made with (checked by its weights'
    sha256): NCHW images in [-1, 1], what the model trains on (up to the posterior's sampling noise)."""
    from data_tools.latent_format import folder_fingerprint

    if run.vae is None:
        raise ValueError(f"--file_list {run.data.file_list} is a latent dataset: pass --pretrained_model_name_or_path "
                         "or --vae_name_or_path to decode its latents into grid.png")
    if folder_fingerprint(run.vae, weights=True) != {k: manifest["dependencies"]["vae"][k]
                                                      for k in ("config", "weights_sha256")}:
        raise ValueError(f"--vae_name_or_path {run.vae}: not the VAE the latents were made with (config or weights "
                         "sha256 differ from the manifest)")
    import paddle
    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(run.vae)
    vae.eval()
    with paddle.no_grad():
        return np.clip(vae.decode(paddle.to_tensor(means)).sample.numpy(), -1.0, 1.0)


def draw(ds, stream, n: int) -> list:
    """The first n samples of logical worker 0 as training batches them (bucket_stream.py): for image parts in
    batches of the dataset's batch size, one bucket each; a latent dataset's one by one."""
    if ds.latents:
        return [stream.next_sample() for _ in range(n)]
    batcher, samples = ds.open_batcher(stream, 0), []
    while len(samples) < n:
        samples += batcher.next_batch()[2]
    return samples[:n]


def main(argv: Optional[List[str]] = None) -> int:
    run = resolve(*parse_args((DataArguments, InspectArguments), argv))
    # Imported here: paddle is slow to import and a bad flag should not wait for it.
    from trainer.loader.text_image_dataset import LoaderError, TextImageDataset

    tokenizer = None
    if run.tokenizer is not None:
        from paddlenlp.transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(run.tokenizer)
    ds = TextImageDataset(run.data, tokenizer, batch_size=run.inspect.batch_size, rank=0, world_size=1,
                          num_workers=0, seed=run.inspect.seed, model_max_length=run.inspect.model_max_length)
    print(ds.describe())
    if ds.latents and run.vae is None:
        print(f"error: --file_list {run.data.file_list} is a latent dataset: pass --pretrained_model_name_or_path "
              "or --vae_name_or_path to decode its latents into grid.png", file=sys.stderr)
        return 1
    try:
        stream = ds.open_stream(0)
        samples = draw(ds, stream, run.inspect.num_samples)
    except LoaderError as e:
        print(str(e), file=sys.stderr)
        return 1

    os.makedirs(run.output_dir, exist_ok=True)
    save_config(os.path.join(run.output_dir, CONFIG_NAME), run)
    bucketed = run.data.aspect_ratio_buckets is not None
    if ds.latents:
        pixels = decode_latents(run, ds.latent_manifests[0], np.stack([s.mean for s in samples]))
        grid(list(to_uint8(pixels))).save(os.path.join(run.output_dir, "grid.png"))
    elif not bucketed:
        grid(list(to_uint8(np.stack([s.pixel_values for s in samples])))).save(
            os.path.join(run.output_dir, "grid.png"))
    else:  # one grid per bucket: a grid's tiles share one size
        for bucket in ds.buckets:
            tiles = [s.pixel_values for s in samples if s.bucket == bucket]
            if tiles:
                grid(list(to_uint8(np.stack(tiles)))).save(
                    os.path.join(run.output_dir, f"grid_{bucket_name(bucket)}.png"))
    ids = ds.tokenize([s.caption for s in samples]) if tokenizer is not None else None
    lines = []
    for i, s in enumerate(samples):
        src, epoch, _, line = s.ref
        line = s.source_line if ds.latents else line
        rec = {"index": i, "caption": s.caption, "raw_caption": s.raw_caption,
               "caption_dropped": s.caption == "" and s.raw_caption != "",
               "source": ds.sources[src].filelist, "part": s.part_path, "line": line + 1, "epoch": epoch}
        if ds.latents:
            rec.update(flipped=s.flipped, input_ids=s.input_ids.tolist())
        elif ids is not None:
            rec["input_ids"] = ids[i].tolist()
        if bucketed:
            rec["bucket"] = bucket_name(s.bucket)
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    write_text_atomic(os.path.join(run.output_dir, "samples.jsonl"), "".join(lines))
    grids = "grid_WxH.png (one per bucket)" if bucketed and not ds.latents else "grid.png"
    print(f"wrote {len(samples)} samples to {run.inspect.output_dir}/{grids} and samples.jsonl "
          f"(config: {CONFIG_NAME})")
    if bucketed:
        counts = {bucket_name(b): sum(s.bucket == b for s in samples) for b in ds.buckets}
        print("samples per bucket: " + json.dumps(counts))
    print("skipped records: " + json.dumps(dict(sorted(stream.skips.counts.items()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
