"""Both record formats (plain and gzip parts, format from the manifest or the flag) and the image transform
(draft decoding, crop-only resize, mode conversion, flip, normalisation)."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from data_tools.part_format import RecordError, encode_record
from helpers import aes_line, image_bytes, image_transform, write_filelist_list, write_source
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset

CHINESE = "一只猫坐在窗台上"


def _captions(ds: TextImageDataset, n: int) -> list:
    it = ds.iter_samples(0)
    return [next(it) for _ in range(n)]


@pytest.mark.unit
def test_reads_laion400m_and_laion_aes_plain_and_gzip(tmp_path):
    img = image_bytes(20, 16, seed=1)
    b64 = base64.b64encode(img)
    plain_400m = [encode_record("a red car", img), encode_record("two dogs", image_bytes(16, 30, seed=2)),
                  CHINESE.encode("gb18030") + b"\tNONE\t" + b64 + b"\n",  # legacy gb18030 dump
                  b"\n"]  # blank lines are not records
    aes = [aes_line("caption en", "blip fallback", img), aes_line(None, "only blip", img),
           aes_line("", "empty caption_en falls back", img)]
    entries = [(write_source(str(tmp_path), "c400m", [plain_400m]), 1.0),
               (write_source(str(tmp_path), "aes", [aes[:2], aes[2:]], gzipped=True, data_format="laion_aes"), 1.0)]
    fl = write_filelist_list(os.path.join(tmp_path, "mix.filelist.list"), entries)
    ds = TextImageDataset(DataArguments(fl, resolution=16, buffer_size=1, caption_dropout_prob=0.0),
                          None, 1, seed=42)
    assert [s.data_format for s in ds.sources] == ["laion400m", "laion_aes"]  # aes from its manifest
    samples = _captions(ds, 60)
    got = {s.caption for s in samples}
    assert got == {"a red car", "two dogs", CHINESE, "caption en", "only blip", "empty caption_en falls back"}
    for s in samples:
        assert s.pixel_values.shape == (3, 16, 16) and s.pixel_values.dtype == np.float32
        assert -1.0 <= s.pixel_values.min() and s.pixel_values.max() <= 1.0
    assert any(s.part_path.endswith(".gz") for s in samples)

    # Without a manifest the explicit flag decides; it also overrides a manifest.
    aes_only = write_source(str(tmp_path), "aes2", [aes], data_format=None)
    fl2 = write_filelist_list(os.path.join(tmp_path, "aes2.filelist.list"), [(aes_only, None)])
    ds2 = TextImageDataset(DataArguments(fl2, resolution=16, data_format="laion_aes", caption_dropout_prob=0.0),
                           None, 1, seed=42)
    assert ds2.sources[0].data_format == "laion_aes" and _captions(ds2, 1)[0].caption


@pytest.mark.unit
def test_caption_dropout_rate(tmp_path):
    fl = write_filelist_list(os.path.join(tmp_path, "x.filelist.list"), [(write_source(
        str(tmp_path), "x", [[encode_record(f"c{i}", image_bytes(8, 8, seed=i)) for i in range(50)]]), None)])
    ds = TextImageDataset(DataArguments(fl, resolution=8, caption_dropout_prob=0.3), None, 1, seed=42)
    samples = _captions(ds, 400)
    dropped = sum(s.caption == "" for s in samples)
    assert abs(dropped - 120) < 4 * (400 * 0.3 * 0.7) ** 0.5
    assert all(s.caption in ("", s.raw_caption) for s in samples)


def _smooth_jpeg(w: int, h: int, quality: int = 92) -> bytes:
    """A natural-ish image (gradients + blurred noise) so that resampling filters behave as on photos."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    noise = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 16 + 1, w // 16 + 1), dtype=np.uint8))
                       .resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    arr = np.stack([x / w * 255, y / h * 255, noise], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _reference_center(img_bytes: bytes, r: int) -> np.ndarray:
    """Full decode, resize the shorter side to r, center crop: the plain way."""
    img = Image.open(io.BytesIO(img_bytes)).convert("RGB")
    w, h = img.size
    rw, rh = max(r, round(w * r / min(w, h))), max(r, round(h * r / min(w, h)))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = round((rw - r) / 2), round((rh - r) / 2)
    arr = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.float32)
    return arr.transpose(2, 0, 1) / 127.5 - 1


@pytest.mark.unit
def test_draft_and_crop_only_resize_match_full_decode(tmp_path):
    big = _smooth_jpeg(900, 640)
    t = image_transform(str(tmp_path), 128, center_crop=True)
    img = Image.open(io.BytesIO(big))
    img.draft("RGB", t.resized_size(900, 640))
    assert img.size == (225, 160)  # decoded at 1/4 scale: the shorter side 160 stays >= 128
    ref = _reference_center(big, 128)
    ours = t(big, np.random.default_rng(0))
    assert ours.shape == ref.shape == (3, 128, 128)
    assert np.abs(ours - ref).mean() < 0.01, np.abs(ours - ref).mean()  # < 1.3 grey levels: DCT-scaled decode
    odd = image_transform(str(tmp_path), 104)
    for w, h in ((108, 159), (215, 268), (159, 108)):  # odd sizes; (104 * (w / 104)) is w + 1 ulp here
        crop = odd(_smooth_jpeg(w, h), np.random.default_rng(3))
        assert crop.shape == (3, 104, 104)
    small = _smooth_jpeg(100, 80)  # too small for draft: only the crop-only resize differs from reference
    assert np.abs(image_transform(str(tmp_path), 64, center_crop=True)(small, np.random.default_rng(0))
                  - _reference_center(small, 64)).max() < 0.05


@pytest.mark.unit
def test_modes_are_converted_transparency_on_white(tmp_path):
    t = image_transform(str(tmp_path), 8, center_crop=True)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    for mode, fmt in (("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG")):
        buf = io.BytesIO()
        im = rgba.convert(mode) if mode != "P" else rgba.convert("RGB").convert("P")
        if mode == "P":
            im.info["transparency"] = 0
        im.save(buf, fmt, **({"transparency": 0} if mode == "P" else {}))
        out = t(buf.getvalue(), np.random.default_rng(0))
        assert out.shape == (3, 8, 8) and np.allclose(out, 1.0), mode  # white, not black
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("1", "PNG"), ("I;16", "PNG")):
        out = t(image_bytes(10, 9, seed=3, fmt=fmt, mode=mode), np.random.default_rng(0))
        assert out.shape == (3, 8, 8) and out.dtype == np.float32, mode


@pytest.mark.unit
def test_random_crop_flip_and_min_size(tmp_path):
    data = image_bytes(40, 20, seed=5, fmt="PNG")
    plain = image_transform(str(tmp_path), 16)
    flip = image_transform(str(tmp_path), 16, random_flip=True)
    lefts = {plain.plan(40, 20, np.random.default_rng(k)).left for k in range(40)}
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 32 - 16  # 40x20 -> 32x16
    flipped = [k for k in range(20) if flip.plan(40, 20, np.random.default_rng(k)).flip]
    assert 0 < len(flipped) < 20
    k = flipped[0]
    a, b = plain(data, np.random.default_rng(k)), flip(data, np.random.default_rng(k))
    assert np.array_equal(a[:, :, ::-1], b)  # same crop, mirrored
    assert np.array_equal(plain(data, np.random.default_rng(k)), a)  # deterministic for the same rng
    with pytest.raises(RecordError) as e:
        image_transform(str(tmp_path), 16, min_image_size=25).open_checked(data)
    assert e.value.reason == "too_small"
    for interp in ("bicubic", "bilinear", "nearest"):
        assert image_transform(str(tmp_path), 16, interpolation=interp)(data, np.random.default_rng(0)).shape == (
            3, 16, 16)
    with pytest.raises(ValueError, match="interpolation"):
        image_transform(str(tmp_path), 16, interpolation="area")
