"""What the device can do, decided once at start, as pure functions of the device's facts.

A feature the device cannot run (fp16, bf16 O2, memory-efficient attention, fused linear without CUDA) is
switched off in the run's resolved config and announced in one line, so the run goes on in a mode the device
supports instead of crashing an hour in. The parsed arguments are never changed: these functions return the
effective settings and the notices, and sd/args.resolve_train puts them into the resolved config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import paddle


@dataclass(frozen=True)
class DeviceFacts:
    cuda: bool  # a CUDA device is visible
    bf16_supported: bool  # compute capability >= 8.0 (only meaningful with cuda)

    @classmethod
    def detect(cls) -> "DeviceFacts":
        cuda = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        return cls(cuda=cuda, bf16_supported=bool(cuda and paddle.amp.is_bfloat16_supported()))


@dataclass(frozen=True)
class Precision:
    fp16: bool
    bf16: bool
    fp16_opt_level: str  # O1 (autocast) | O2 (low-precision weights); Paddle's name covers bf16 too


@dataclass(frozen=True)
class ModelFeatures:
    memory_efficient_attention: bool
    fused_linear: bool


def has_cuda() -> bool:
    return DeviceFacts.detect().cuda


def device_name() -> str:
    return "gpu" if has_cuda() else "cpu"


def resolve_precision(fp16: bool, bf16: bool, opt_level: str, device: DeviceFacts) -> Tuple[Precision, List[str]]:
    """The precision this device can run for the requested one, and a notice for every change."""
    notices = []
    if fp16 and not device.cuda:
        fp16 = False
        notices.append("fp16 needs a CUDA device; this one has none: training in float32.")
    if bf16:
        if device.cuda and not device.bf16_supported:
            bf16 = False
            notices.append("bf16 needs compute capability >= 8.0 (A100, 30x0, ...); this GPU has less: training in "
                           "float32 (use --fp16 instead).")
        elif not device.cuda and opt_level == "O2":
            opt_level = "O1"
            notices.append("bf16 O2 (pure bf16 weights) needs a CUDA device: training bf16 O1 (autocast) on CPU.")
    return Precision(fp16=fp16, bf16=bf16, fp16_opt_level=opt_level), notices


def resolve_model_features(memory_efficient_attention: bool, fused_linear: bool,
                           device: DeviceFacts) -> Tuple[ModelFeatures, List[str]]:
    """The model features this device can run for the requested ones, and a notice for every change."""
    notices = []
    if memory_efficient_attention and not device.cuda:
        memory_efficient_attention = False
        notices.append("memory-efficient (xformers/flash) attention needs a CUDA device: using standard attention.")
    if fused_linear and not device.cuda:
        fused_linear = False
        notices.append("fused linear needs a CUDA device: using paddle.nn.Linear.")
    return ModelFeatures(memory_efficient_attention, fused_linear), notices
