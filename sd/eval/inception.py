"""Inception-v3 as the FID literature uses it (the TF graph inception-2015-12-05, as ported by pytorch-fid), in
Paddle, and its weights file.

The layers are named as torchvision's Inception3 names them, so the state dict of pytorch-fid's
pt_inception-2015-12-05-6726825d.pth maps onto it one to one (scripts/convert_inception_weights.py). The FID
variant differs from torchvision's network in three places, which change the numbers if missed:
- the 3x3 average pools inside Mixed_5b-5d (A blocks), Mixed_6b-6e (C blocks) and Mixed_7b (the first E block)
  leave the zero padding out of the average (TF's pooling; paddle's `exclusive=True`);
- Mixed_7c (the second E block) pools with a 3x3 max pool where the paper has an average;
- the classifier has 1008 outputs (unused for FID: features are taken before it).
Every convolution is bias-free, followed by batch norm (eps 1e-3) and ReLU. Features are the 2048-d global
average of Mixed_7c ("pool3").

`channel_divisor` shrinks every width by the same factor (1, 2, 4, 8 or 16: every width is a multiple of 16), so a
test can run the same structure tiny; the weights file records it.

Input preprocessing (`preprocess`), both to 299 x 299 RGB:
- "bilinear": pixels / 255, bilinear resize (half-pixel centres, no antialiasing, as torch's interpolate with
  align_corners=False), then 2x - 1: pytorch-fid's network input, and MLPerf's SDv2 FID.
- "clean": clean-fid's "clean" mode: each channel resized as float by PIL's bicubic filter, clipped to [0, 255],
  then (x - 128) / 128.

Weights file: a .safetensors of paddle tensors (BatchNorm running stats as `_mean` / `_variance`, fc.weight as
[in, out]) with metadata {"format": WEIGHTS_FORMAT, "channel_divisor": "N"}. No pickle is read.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from PIL import Image

WEIGHTS_FORMAT = "fid_inception_v3"
INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
DIVISORS = (1, 2, 4, 8, 16)
RESIZE_MODES = ("bilinear", "clean")


class BasicConv2d(nn.Layer):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, kernel, stride=stride, padding=padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout, epsilon=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, exclusive=True)


class BlockA(nn.Layer):  # Mixed_5b, 5c, 5d
    def __init__(self, cin: int, pool_features: int, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), 1)
        self.branch5x5_1 = BasicConv2d(cin, w(48), 1)
        self.branch5x5_2 = BasicConv2d(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return paddle.concat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], axis=1)


class BlockB(nn.Layer):  # Mixed_6a: grid reduction 35 -> 17
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return paddle.concat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], axis=1)


class BlockC(nn.Layer):  # Mixed_6b..6e: factorised 7x7
    def __init__(self, cin: int, c7: int, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, w(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, w(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, w(192), 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return paddle.concat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], axis=1)


class BlockD(nn.Layer):  # Mixed_7a: grid reduction 17 -> 8
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch3x3_2 = BasicConv2d(w(192), w(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7x3_2 = BasicConv2d(w(192), w(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(w(192), w(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(w(192), w(192), 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return paddle.concat([b3, b7, F.max_pool2d(x, 3, stride=2)], axis=1)


class BlockE(nn.Layer):  # Mixed_7b (TF average pool), Mixed_7c (max pool: the FID graph's quirk)
    def __init__(self, cin: int, w, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, w(320), 1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), 1)
        self.branch3x3_2a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, w(192), 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        b3 = paddle.concat([self.branch3x3_2a(s), self.branch3x3_2b(s)], axis=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = paddle.concat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return paddle.concat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=1)


class FIDInceptionV3(nn.Layer):
    """pool3 features [N, 2048 / channel_divisor] of images already preprocessed to [N, 3, 299, 299]."""

    def __init__(self, channel_divisor: int = 1):
        super().__init__()
        if channel_divisor not in DIVISORS:
            raise ValueError(f"channel_divisor must be one of {DIVISORS}, got {channel_divisor}")
        self.channel_divisor = channel_divisor

        def w(c: int) -> int:
            return c // channel_divisor

        self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), 3)
        self.Mixed_5b = BlockA(w(192), w(32), w)
        self.Mixed_5c = BlockA(w(256), w(64), w)
        self.Mixed_5d = BlockA(w(288), w(64), w)
        self.Mixed_6a = BlockB(w(288), w)
        self.Mixed_6b = BlockC(w(768), w(128), w)
        self.Mixed_6c = BlockC(w(768), w(160), w)
        self.Mixed_6d = BlockC(w(768), w(160), w)
        self.Mixed_6e = BlockC(w(768), w(192), w)
        self.Mixed_7a = BlockD(w(768), w)
        self.Mixed_7b = BlockE(w(1280), w, max_pool=False)
        self.Mixed_7c = BlockE(w(2048), w, max_pool=True)
        self.fc = nn.Linear(w(2048), NUM_CLASSES)  # in the weights file; not used for features
        self.feature_dim = w(FEATURE_DIM)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return paddle.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def save_weights(model: FIDInceptionV3, path: str, extra_metadata: Dict[str, str] = None) -> None:
    """The model's parameters and batch-norm statistics as a weights file (atomic)."""
    from safetensors.numpy import save

    from data_tools.fileio import atomic_writer

    tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in model.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "channel_divisor": str(model.channel_divisor), **(extra_metadata or {})}
    with atomic_writer(path) as f:
        f.write(save(tensors, metadata=metadata))


def expected_shapes(channel_divisor: int) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name of the network and its shape (paddle layout)."""
    with paddle.LazyGuard():  # shapes only: nothing is allocated
        model = FIDInceptionV3(channel_divisor)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(shapes: Dict[str, Tuple[int, ...]], channel_divisor: int, what: str) -> None:
    """One error naming what is missing, extra or misshapen, against the network of that divisor."""
    want = expected_shapes(channel_divisor)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = [f"{k} {tuple(shapes[k])} (expected {want[k]})" for k in sorted(set(want) & set(shapes))
             if tuple(shapes[k]) != want[k]]
    if missing or extra or wrong:
        parts = [f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "",
                 f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else "",
                 f"wrong shapes {wrong[:3]}" if wrong else ""]
        raise ValueError(f"{what} does not fit the FID Inception-v3: " + "; ".join(p for p in parts if p))


def read_weights_header(path: str) -> Tuple[int, Dict[str, Tuple[int, ...]]]:
    """(channel divisor, tensor shapes) of a weights file, checked against the network without reading the
    tensors: a wrong file is one error before anything loads."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception_weights: no such file: {path} (convert pytorch-fid's weights with "
                                "scripts/convert_inception_weights.py)")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"--inception_weights {path}: not a safetensors file ({e})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"--inception_weights {path}: not written by scripts/convert_inception_weights.py "
                         f"(metadata format {metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
    divisor = metadata.get("channel_divisor", "1")
    if divisor not in {str(d) for d in DIVISORS}:
        raise ValueError(f"--inception_weights {path}: channel_divisor {divisor} not in {DIVISORS}")
    check_shapes(shapes, int(divisor), f"--inception_weights {path}")
    return int(divisor), shapes


def load_inception(path: str) -> FIDInceptionV3:
    """The network in eval mode, from a weights file written by scripts/convert_inception_weights.py."""
    from safetensors.numpy import load_file

    divisor, _ = read_weights_header(path)
    model = FIDInceptionV3(divisor)
    model.set_state_dict({k: paddle.to_tensor(v.astype(np.float32)) for k, v in load_file(path).items()})
    model.eval()
    return model


def _clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize of one uint8 HWC image: per channel, as float, PIL bicubic, clipped."""
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((INPUT_SIZE, INPUT_SIZE), resample=Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, axis=0), 0, 255)


def preprocess(images: Sequence[np.ndarray], mode: str) -> paddle.Tensor:
    """uint8 HWC RGB images (any size, all the same size for "bilinear") -> the network's [N, 3, 299, 299]."""
    if mode == "clean":
        x = np.stack([_clean_resize(im) for im in images]).astype(np.float32)
        return paddle.to_tensor((x - 128.0) / 128.0)
    if mode != "bilinear":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    x = paddle.to_tensor(np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    x = F.interpolate(x, size=[INPUT_SIZE, INPUT_SIZE], mode="bilinear", align_corners=False, align_mode=0)
    return 2.0 * x - 1.0


@paddle.no_grad()
def inception_features(model: FIDInceptionV3, images: Sequence[np.ndarray], mode: str,
                       batch_size: int = 32) -> np.ndarray:
    """[N, feature_dim] float64 pool3 features of uint8 HWC images, in batches; "bilinear" batches group images
    of one size."""
    out: List[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        if mode == "bilinear" and len({im.shape for im in chunk}) > 1:
            parts = [model(preprocess([im], mode)).numpy() for im in chunk]
            out.append(np.concatenate(parts))
        else:
            out.append(model(preprocess(chunk, mode)).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, model.feature_dim))
