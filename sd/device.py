"""What the device can do, decided once at start.

A feature the device cannot run (fp16, bf16 O2, memory-efficient attention, fused linear without CUDA) is
switched off here and announced in one line, so the run goes on in a mode the device supports instead of
crashing an hour in. Nothing here changes silently: every switch returns a notice that train.py prints.
"""
from __future__ import annotations

from typing import List

import paddle


def has_cuda() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def device_name() -> str:
    return "gpu" if has_cuda() else "cpu"


def resolve_precision(args) -> List[str]:
    """Adjust args.fp16 / args.bf16 / args.fp16_opt_level to what this device supports; return the notices."""
    notices = []
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 are exclusive: pick one")
    if args.fp16_opt_level not in ("O1", "O2"):
        raise ValueError(f"--fp16_opt_level must be O1 or O2, got {args.fp16_opt_level!r}")
    cuda = has_cuda()
    if args.fp16 and not cuda:
        args.fp16 = False
        notices.append("fp16 needs a CUDA device; this one has none: training in float32.")
    if args.bf16:
        if cuda and not paddle.amp.is_bfloat16_supported():
            args.bf16 = False
            notices.append("bf16 needs compute capability >= 8.0 (A100, 30x0, ...); this GPU has less: training in "
                           "float32 (use --fp16 instead).")
        elif not cuda and args.fp16_opt_level == "O2":
            args.fp16_opt_level = "O1"
            notices.append("bf16 O2 (pure bf16 weights) needs a CUDA device: training bf16 O1 (autocast) on CPU.")
    return notices


def resolve_model_features(model_args) -> List[str]:
    """Switch off model features the device cannot run; return the notices."""
    notices = []
    if model_args.enable_xformers_memory_efficient_attention and not has_cuda():
        model_args.enable_xformers_memory_efficient_attention = False
        notices.append("memory-efficient (xformers/flash) attention needs a CUDA device: using standard attention.")
    if model_args.use_fused_linear and not has_cuda():
        model_args.use_fused_linear = False
        notices.append("fused linear needs a CUDA device: using paddle.nn.Linear.")
    return notices
