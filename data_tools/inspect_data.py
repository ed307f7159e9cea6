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
own folder, the working folder, or absolute paths). A stream that cannot yield (too many bad records in a row)
ends with its one-line reason on stderr and exit status 1, as training would.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from data_tools.fileio import write_text_atomic
from sd.config import parse_args, save_config
from sd.images import grid, to_uint8
from trainer.loader.config import DataArguments

CONFIG_NAME = "inspect_config.json"


@dataclass(frozen=True)
class InspectArguments:
    output_dir: str = field(metadata={"help": "Where grid.png, samples.jsonl and inspect_config.json are written."})
    num_samples: int = field(default=16, metadata={"help": "Samples to draw."})
    seed: int = field(default=42, metadata={"help": "The training seed to reproduce (train.py's --seed)."})
    tokenizer: Optional[str] = field(
        default=None, metadata={"help": "A CLIPTokenizer folder; adds input_ids to samples.jsonl."})
    model_max_length: int = field(default=77, metadata={"help": "Tokenizer padding/truncation length."})

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.model_max_length < 2:
            raise ValueError(f"--model_max_length must be >= 2, got {self.model_max_length}")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise FileNotFoundError(f"--tokenizer: no such folder: {self.tokenizer}")


@dataclass(frozen=True)
class InspectRun:
    """The resolved config: the parsed arguments as given plus the absolute paths they name. What runs and what
    inspect_config.json holds."""

    data: DataArguments
    inspect: InspectArguments
    file_list: str
    output_dir: str
    tokenizer: Optional[str]


def resolve(data: DataArguments, inspect: InspectArguments) -> InspectRun:
    return InspectRun(data, inspect, file_list=os.path.abspath(data.file_list),
                      output_dir=os.path.abspath(inspect.output_dir),
                      tokenizer=os.path.abspath(inspect.tokenizer) if inspect.tokenizer else None)


def main(argv: Optional[List[str]] = None) -> int:
    run = resolve(*parse_args((DataArguments, InspectArguments), argv))
    # Imported here: paddle is slow to import and a bad flag should not wait for it.
    from trainer.loader.text_image_dataset import LoaderError, TextImageDataset

    tokenizer = None
    if run.tokenizer is not None:
        from paddlenlp.transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(run.tokenizer)
    ds = TextImageDataset(run.data, tokenizer, batch_size=1, rank=0, world_size=1, num_workers=0,
                          seed=run.inspect.seed, model_max_length=run.inspect.model_max_length)
    print(ds.describe())
    try:
        stream = ds.open_stream(0)
        samples = [stream.next_sample() for _ in range(run.inspect.num_samples)]
    except LoaderError as e:
        print(str(e), file=sys.stderr)
        return 1

    os.makedirs(run.output_dir, exist_ok=True)
    save_config(os.path.join(run.output_dir, CONFIG_NAME), run)
    grid(list(to_uint8(np.stack([s.pixel_values for s in samples])))).save(os.path.join(run.output_dir, "grid.png"))
    ids = ds.tokenize([s.caption for s in samples]) if tokenizer is not None else None
    lines = []
    for i, s in enumerate(samples):
        src, epoch, _, line = s.ref
        rec = {"index": i, "caption": s.caption, "raw_caption": s.raw_caption,
               "caption_dropped": s.caption == "" and s.raw_caption != "",
               "source": ds.sources[src].filelist, "part": s.part_path, "line": line + 1, "epoch": epoch}
        if ids is not None:
            rec["input_ids"] = ids[i].tolist()
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    write_text_atomic(os.path.join(run.output_dir, "samples.jsonl"), "".join(lines))
    print(f"wrote {len(samples)} samples to {run.inspect.output_dir}/grid.png and samples.jsonl "
          f"(config: {CONFIG_NAME})")
    print("skipped records: " + json.dumps(dict(sorted(stream.skips.counts.items()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
