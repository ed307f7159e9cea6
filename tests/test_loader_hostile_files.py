"""File lists as both tools write them (the reference's layouts rebuilt from its README and its
create_pretraining_data.py, and ours), hostile file lists, and pictures that must come out upright and 8-bit."""
from __future__ import annotations

import gzip
import io
import os
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_tools.filelists import read_filelist_list
from data_tools.part_format import encode_record
from helpers import (PY, ROOT, create, good_corpus, image_bytes, image_transform, records, write_filelist_list,
                     write_source)
from trainer.loader.config import DataArguments
from trainer.loader.text_image_dataset import TextImageDataset


def _reference_layout(run_dir: str, top: str, part_rel: str, filelist_rel: str, repeat: int) -> str:
    """Files as the reference writes them: paths relative to the folder the recipe runs from, the .filelist with
    no trailing newline (its create_pretraining_data.py joins the lines with "\\n"). Returns the list path."""
    part = os.path.join(run_dir, part_rel)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    with open(part, "wb") as f:
        f.write(gzip.compress(b"".join(records("ref", 5, (12, 12)))))
    filelist = os.path.join(run_dir, filelist_rel)
    os.makedirs(os.path.dirname(filelist), exist_ok=True)
    with open(filelist, "w") as f:
        f.write("\n".join([part_rel] * repeat))
    with open(os.path.join(run_dir, top), "w") as f:
        f.write(filelist_rel + "\n")
    return top


@pytest.mark.unit
def test_the_reference_readme_demo_layout_reads_from_the_run_folder(tmp_path, monkeypatch):
    """README 3.2: data/filelist/train.filelist.list -> ./data/filelist/laion400m_en.filelist ->
    ./data/laion400m_new/part-00001.gz, all relative to the folder the recipe runs from."""
    top = _reference_layout(str(tmp_path), "data/filelist/train.filelist.list", "./data/laion400m_new/part-00001.gz",
                            "./data/filelist/laion400m_en.filelist", repeat=6)
    monkeypatch.chdir(tmp_path)
    ds = TextImageDataset(DataArguments(top, resolution=8, caption_dropout_prob=0.0), None, 1, seed=1)
    assert "found by working folder, parts by working folder" in ds.describe()
    assert ds.sources[0].parts == (str(tmp_path / "data" / "laion400m_new" / "part-00001.gz"),) * 6
    assert next(ds.iter_samples(0)).caption.startswith("ref-")
    # From another folder the relative paths lead nowhere: one error naming every place tried.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError) as e:
        read_filelist_list(str(tmp_path / top))
    msg = str(e.value)
    assert "train.filelist.list:1: filelist not found: './data/filelist/laion400m_en.filelist'" in msg
    assert f"{tmp_path}/data/filelist/data/filelist/laion400m_en.filelist (list folder)" in msg
    assert f"{tmp_path}/elsewhere/data/filelist/laion400m_en.filelist (working folder)" in msg


@pytest.mark.smoke
def test_inspect_reads_what_the_reference_data_tool_writes(tmp_path):
    """create_pretraining_data.py (the reference's) writes processed_data/filelist/custom_dataset.filelist(.list)
    with paths relative to the recipe folder; inspect_data.py run from there reads them unchanged."""
    top = _reference_layout(str(tmp_path), "processed_data/filelist/custom_dataset.filelist.list",
                            "processed_data/laion400m_format_data/part-000001.gz",
                            "processed_data/filelist/custom_dataset.filelist", repeat=3)
    proc = subprocess.run([PY, os.path.join(ROOT, "data_tools", "inspect_data.py"), "--file_list", top,
                           "--output_dir", "look", "--num_samples", "2", "--resolution", "8"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "found by working folder, parts by working folder" in proc.stdout
    assert (tmp_path / "look" / "grid.png").is_file()


@pytest.mark.unit
def test_our_tools_output_reads_from_anywhere_even_with_spaces(tmp_path, monkeypatch):
    jsonl, _ = good_corpus(str(tmp_path / "in"), 6)
    out = str(tmp_path / "my data set")  # a space in the output path
    create([jsonl], out)
    monkeypatch.chdir("/")
    ds = TextImageDataset(DataArguments(os.path.join(out, "filelist", "custom_dataset.filelist.list"),
                                        resolution=8), None, 1, seed=1)
    assert "found by absolute, parts by absolute" in ds.describe()
    # Parts written relative to the filelist's folder (tests' own layout): found there, wherever we run from.
    fl = write_filelist_list(str(tmp_path / "x.filelist.list"),
                             [(write_source(str(tmp_path), "rel", [records("r", 2)]), None)])
    assert "parts by list folder" in TextImageDataset(DataArguments(fl, resolution=8), None, 1, seed=1).describe()


@pytest.mark.unit
def test_filelist_list_lines_weights_and_self_reference(tmp_path):
    fl = write_source(str(tmp_path / "with space"), "a", [records("a", 2)])
    top = tmp_path / "t.filelist.list"
    top.write_text(f"{fl}\n{fl} 0.25\n")  # a path with a space, with and without a weight
    assert [s.weight for s in read_filelist_list(str(top))] == [1.0, 0.25]
    for weight in ("inf", "nan", "-inf", "0", "-2", "1e309"):
        top.write_text(f"{fl} 1\n{fl} {weight}\n")
        with pytest.raises(ValueError, match=rf"t\.filelist\.list:2: weight must be a finite number > 0, got "
                                             rf"'{weight}'"):
            read_filelist_list(str(top))
    top.write_text(f"{fl} 1e308\n{fl} 1e308\n")  # each finite, the sum is not
    with pytest.raises(ValueError, match=r"t\.filelist\.list: the weights sum to inf"):
        read_filelist_list(str(top))
    top.write_text(f"{top}\n")
    with pytest.raises(ValueError, match="names itself"):
        read_filelist_list(str(top))
    loop = tmp_path / "loop.filelist"
    loop.write_text(f"{loop}\n")
    top.write_text(f"{loop}\n")
    with pytest.raises(ValueError, match="lists itself"):
        read_filelist_list(str(top))
    folder_part = tmp_path / "dir.filelist"
    (tmp_path / "part-dir").mkdir()
    folder_part.write_text("part-dir\n")
    top.write_text(f"{folder_part}\n")
    with pytest.raises(FileNotFoundError, match=r"part-dir \(list folder: exists but is not a regular file\)"):
        read_filelist_list(str(top))
    top.write_bytes(b"\xff\xfe\x00x\n")
    with pytest.raises(ValueError, match=r"t\.filelist\.list: cannot read this --file_list as UTF-8"):
        read_filelist_list(str(top))


# ------------------------------------------------------------------------------------------ pictures
def _jpeg_with_orientation(upright: Image.Image, orientation: int) -> bytes:
    """The bytes a camera writes: pixels stored turned, and the EXIF tag that turns them back."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    upright.transpose(undo[orientation]).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _smooth(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin((x + 2 * y) / 9.0)], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.unit
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_rotated_photos_train_upright(tmp_path, orientation):
    upright = _smooth(60, 44)
    data = _jpeg_with_orientation(upright, orientation)
    # What the photo looks like: Pillow's decode, turned by its tag, kept losslessly.
    seen = _png(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    for resolution, tol in ((24, 1e-5), (8, 0.05)):  # 8 px: the JPEG is draft-decoded, the PNG is not
        t = image_transform(str(tmp_path), resolution, interpolation="bilinear")
        got = t(data, np.random.default_rng(3))
        want = t(seen, np.random.default_rng(3))
        assert np.abs(got - want).mean() < tol, (resolution, np.abs(got - want).mean())
        sideways = t(_png(Image.open(io.BytesIO(data))), np.random.default_rng(3)) if orientation != 3 else None
        if sideways is not None:
            assert np.abs(got - sideways).mean() > 10 * max(tol, np.abs(got - want).mean())
    assert t.open_checked(data).size[::-1 if orientation in (6, 8) else 1] == (60, 44)


@pytest.mark.unit
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((20, 30), 32768, np.uint16)  # mid-grey in 16 bits
    arr[:, :15] = 65535
    data = _png(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = image_transform(str(tmp_path), 16, center_crop=True, interpolation="nearest")(data, np.random.default_rng(0))
    values = np.unique(np.round((out + 1) * 127.5))
    assert set(values) <= {128.0, 255.0} and 128.0 in values, values


@pytest.mark.unit
def test_a_zero_byte_image_and_a_non_image_are_skips_not_crashes(tmp_path):
    lines = [encode_record("empty", b""), encode_record("text", b"just text"), encode_record("ok", image_bytes())]
    fl = write_filelist_list(str(tmp_path / "x.filelist.list"), [(write_source(str(tmp_path), "x", [lines]), None)])
    stream = TextImageDataset(DataArguments(fl, resolution=8, caption_dropout_prob=0.0), None, 1,
                              seed=1).open_stream(0)
    assert {stream.next_sample().caption for _ in range(3)} == {"ok"}
    assert stream.skips.counts["bad_base64"] >= 1 and stream.skips.counts["bad_image"] >= 1
