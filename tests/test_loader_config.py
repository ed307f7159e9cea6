"""trainer/loader/config.py DataArguments: the one loader config, validated once, varied only by replace()."""
from __future__ import annotations

import dataclasses
import os

import pytest

from helpers import simple_dataset, write_filelist_list
from sd.config import parse_args
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset

pytestmark = pytest.mark.unit


@pytest.fixture()
def file_list(tmp_path):
    return write_filelist_list(os.path.join(tmp_path, "x.filelist.list"), [("x.filelist", None)])


@pytest.mark.parametrize("field,value,error,message", [
    ("file_list", None, ValueError, "--file_list is required"),
    ("file_list", "", ValueError, "--file_list is required"),
    ("file_list", "no/such.filelist.list", FileNotFoundError, "--file_list: no such file: no/such.filelist.list"),
    ("resolution", 0, ValueError, "--resolution must be a positive multiple of 8, got 0"),
    ("resolution", -8, ValueError, "--resolution must be a positive multiple of 8, got -8"),
    ("resolution", 12, ValueError, "--resolution must be a positive multiple of 8, got 12"),  # was legal before
    ("data_format", "webdataset", ValueError, "--data_format must be one of .*, got 'webdataset'"),
    ("interpolation", "area", ValueError, "--interpolation must be one of .*lanczos.*, got 'area'"),
    ("min_image_size", -1, ValueError, "--min_image_size must be >= 0, got -1"),
    ("caption_dropout_prob", 1.5, ValueError, r"--caption_dropout_prob must be in \[0, 1\], got 1.5"),
    ("caption_dropout_prob", -0.1, ValueError, r"--caption_dropout_prob must be in \[0, 1\], got -0.1"),
    ("buffer_size", 0, ValueError, r"--buffer_size \(--shuffle_buffer_size\) must be >= 1, got 0"),
    ("shuffle_every_n_samples", 0, ValueError, "--shuffle_every_n_samples must be >= 1, got 0"),
    ("num_records", -1, ValueError, "--num_records must be >= 0, got -1"),
    ("max_consecutive_skips", 0, ValueError, "--max_consecutive_skips must be >= 1, got 0"),
    ("max_line_bytes", 10, ValueError, "--max_line_bytes must be >= 1024, got 10"),
    ("max_image_pixels", 0, ValueError, r"--max_image_pixels must be in \[1, 178956970\], got 0"),
    ("max_image_pixels", 10 ** 9, ValueError, r"--max_image_pixels must be in \[1, 178956970\]"),
])
def test_each_bad_value_is_one_clear_error(file_list, field, value, error, message):
    kw = {"file_list": file_list, field: value}
    with pytest.raises(error, match=f"^{message}") as e:
        DataArguments(**kw)
    assert "\n" not in str(e.value)


def test_defaults_are_training_defaults_and_the_flags_are_generated(file_list):
    data, = parse_args((DataArguments,), ["--file_list", file_list])
    assert data == DataArguments(file_list)
    assert (data.resolution, data.data_format, data.interpolation, data.center_crop, data.random_flip,
            data.min_image_size, data.caption_dropout_prob, data.buffer_size) == (
        512, None, "lanczos", False, False, 0, 0.1, 256)
    data, = parse_args((DataArguments,), ["--file_list", file_list, "--center_crop", "--random_flip", "True",
                                          "--interpolation", "nearest", "--resolution", "64"])
    assert data.center_crop and data.random_flip and data.interpolation == "nearest" and data.resolution == 64
    with pytest.raises(SystemExit):  # argparse's choices, before the dataclass sees the value
        parse_args((DataArguments,), ["--file_list", file_list, "--interpolation", "area"])
    assert data.notices() == ()


def test_the_reference_data_flags_are_accepted_with_their_meaning(file_list):
    """sd_args.py's SDDataArguments: --buffer_size is our shuffle buffer (--shuffle_buffer_size still works, the
    same field), --shuffle_every_n_samples, --num_records (accepted, ignored with a notice), and every
    interpolation paddle.vision.transforms.Resize takes."""
    for flag in ("--buffer_size", "--shuffle_buffer_size"):
        data, = parse_args((DataArguments,), ["--file_list", file_list, flag, "100"])
        assert data.buffer_size == 100 and data == DataArguments(file_list, buffer_size=100)
    data, = parse_args((DataArguments,), ["--file_list", file_list, "--num_records", "10000000",
                                          "--shuffle_every_n_samples", "5"])
    assert data.shuffle_every_n_samples == 5 and data.num_records == 10000000
    (notice,) = data.notices()
    assert "--num_records 10000000" in notice and "ignored" in notice and "\n" not in notice
    for name in ("nearest", "bilinear", "bicubic", "box", "lanczos", "hamming"):
        data, = parse_args((DataArguments,), ["--file_list", file_list, "--interpolation", name])
        assert data.interpolation == name


def test_a_replaced_variant_is_validated_and_leaves_the_original_alone(tmp_path, file_list):
    train = DataArguments(file_list, resolution=64, random_flip=True, caption_dropout_prob=0.3)
    before = dataclasses.asdict(train)
    held_out = write_filelist_list(os.path.join(tmp_path, "eval.filelist.list"), [("e.filelist", None)])
    variant = dataclasses.replace(train, file_list=held_out, center_crop=True, random_flip=False,
                                  caption_dropout_prob=0.0)
    assert dataclasses.asdict(train) == before
    assert (variant.file_list, variant.center_crop, variant.random_flip, variant.caption_dropout_prob,
            variant.resolution) == (held_out, True, False, 0.0, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.random_flip = False  # parsed arguments are never changed; a variant is a replace()
    with pytest.raises(FileNotFoundError, match="--file_list"):
        dataclasses.replace(train, file_list=str(tmp_path / "typo.filelist.list"))


def test_the_dataset_reads_its_settings_from_the_data_arguments(tmp_path):
    fl, _ = simple_dataset(str(tmp_path), [("a", 1, 4, None)], res_size=(24, 20))
    data = DataArguments(fl, resolution=16, center_crop=True, caption_dropout_prob=0.0, buffer_size=2)
    ds = TextImageDataset(data, None, 1, seed=5)
    assert ds.data is data and ds.transform.data is data and ds.open_stream(0).cfg.data is data
    sample = next(ds.iter_samples(0))
    assert sample.pixel_values.shape == (3, 16, 16) and sample.caption == sample.raw_caption
    assert "16px, seed 5" in ds.describe()
