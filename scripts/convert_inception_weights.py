#!/usr/bin/env python
"""Convert pytorch-fid's Inception weights (the TF graph inception-2015-12-05 that published FIDs use) into the
safetensors file `eval.py score --inception_weights` and training's --inception_weights read.

    python scripts/convert_inception_weights.py --source pt_inception-2015-12-05-6726825d.pth \
        --output weights/pt_inception-2015-12-05.safetensors           (torch installed)
    python scripts/convert_inception_weights.py --source pt_inception-2015-12-05.npz \
        --output weights/pt_inception-2015-12-05.safetensors           (no torch here)

The .pth is a pickle. With torch installed it is read by torch.load(weights_only=True), torch's restricted
unpickler that builds tensors and containers only and refuses any other object. Without torch nothing here
unpickles it: export it once where torch is installed, to a plain .npz that is read with allow_pickle=False:

    import numpy as np, torch
    state = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
    np.savez("pt_inception-2015-12-05.npz", **{k: v.numpy() for k, v in state.items()})

Conversion (pure: `convert`): BatchNorm running_mean / running_var -> paddle's _mean / _variance,
num_batches_tracked dropped, fc.weight transposed to paddle's [in, out]; every name and shape is checked against
sd/eval/inception.FIDInceptionV3 before anything is written, and the output records the format, the channel
divisor (1 for the real network) and the source's sha256 (pytorch-fid's file name carries the first 8 hex digits
of it: 6726825d).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

PYTORCH_FID_SHA256_PREFIX = "6726825d"


@dataclass(frozen=True)
class ConvertArguments:
    source: str = field(metadata={"help": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (needs torch), or "
                                          "its .npz export (see this script's docstring)"})
    output: str = field(metadata={"help": "the .safetensors to write"})

    def __post_init__(self) -> None:
        if not self.source.endswith((".pth", ".pt", ".npz")):
            raise ValueError(f"--source {self.source}: expected a .pth (pytorch-fid) or a .npz export")
        if not self.output.endswith(".safetensors"):
            raise ValueError(f"--output {self.output}: must end in .safetensors")


def read_source(path: str) -> Dict[str, np.ndarray]:
    """The state dict as numpy arrays, never through an unrestricted unpickler."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--source: no such file: {path}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except ValueError as e:
            raise ValueError(f"{path}: not an .npz of plain arrays ({e})") from None
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path} is a torch pickle and torch is not installed here: export it to .npz where torch "
                         "is (the 3 lines in scripts/convert_inception_weights.py's docstring) and convert that"
                         ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def convert(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """torchvision-named Inception-v3 tensors -> FIDInceptionV3's paddle tensors (float32)."""
    out: Dict[str, np.ndarray] = {}
    for name, value in state.items():
        if name.endswith(".num_batches_tracked"):
            continue
        if name.endswith(".running_mean"):
            name = name[:-len("running_mean")] + "_mean"
        elif name.endswith(".running_var"):
            name = name[:-len("running_var")] + "_variance"
        value = np.asarray(value, np.float32)
        out[name] = np.ascontiguousarray(value.T if name == "fc.weight" else value)
    return out


def channel_divisor(tensors: Dict[str, np.ndarray]) -> int:
    first = tensors.get("Conv2d_1a_3x3.conv.weight")
    if first is None or first.ndim != 4 or first.shape[0] < 1 or 32 % first.shape[0]:
        raise ValueError("not an Inception-v3 state dict: no Conv2d_1a_3x3.conv.weight of 32 (or 32/N) filters")
    return 32 // first.shape[0]


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    from safetensors.numpy import save

    from data_tools.fileio import atomic_writer
    from sd.config import parse_args
    from sd.eval.inception import WEIGHTS_FORMAT, check_shapes

    argv = sys.argv[1:] if argv is None else argv
    try:
        (args,) = parse_args([ConvertArguments], argv, prog="convert_inception_weights.py")
        tensors = convert(read_source(args.source))
        divisor = channel_divisor(tensors)
        check_shapes({k: v.shape for k, v in tensors.items()}, divisor, args.source)
        digest = sha256_of(args.source)
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--output {args.output}: its folder does not exist")
    except (ValueError, OSError) as e:
        print(f"convert_inception_weights.py: error: {e}", file=sys.stderr)
        return 1
    if args.source.endswith((".pth", ".pt")) and not digest.startswith(PYTORCH_FID_SHA256_PREFIX):
        print(f"warning: {args.source} has sha256 {digest[:16]}..., not pytorch-fid's {PYTORCH_FID_SHA256_PREFIX}...: "
              "FIDs from it are not comparable with published ones", file=sys.stderr)
    metadata = {"format": WEIGHTS_FORMAT, "channel_divisor": str(divisor),
                "source": os.path.basename(args.source), "source_sha256": digest}
    with atomic_writer(args.output) as f:
        f.write(save(tensors, metadata=metadata))
    print(f"{len(tensors)} tensors (channel divisor {divisor}) from {args.source} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
