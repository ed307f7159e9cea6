"""The part-file format (records, parts: part_format) and the filelists and manifest lookup (filelists)."""
import base64
import gzip
import json
import os

import pytest

from data_tools import filelists as fl
from data_tools import part_format as pf

pytestmark = pytest.mark.unit


def test_caption_sanitising_keeps_one_line_of_three_fields():
    raw = " a\tb\nc\r\u2028d\x00e\u0085f "
    line = pf.encode_record(raw, b"\x89PNG")
    assert line.count(b"\n") == 1 and line.count(b"\t") == 2
    caption, image = pf.parse_record(line, "laion400m")
    assert caption == "a b c  d e f" and image == b"\x89PNG"


@pytest.mark.parametrize("gzipped", [False, True])
def test_part_round_trip_and_deterministic_bytes(tmp_path, gzipped):
    records = [(f"caption {i} 雪", os.urandom(50 + i)) for i in range(5)]
    paths = [tmp_path / f"a{gzipped}", tmp_path / f"b{gzipped}"]
    for path in paths:
        with pf.open_part_writer(str(path), gzipped) as w:
            for caption, image in records:
                w.write(pf.encode_record(caption, image))
    assert paths[0].read_bytes() == paths[1].read_bytes()  # no mtime or file name in the gzip header
    assert pf.is_gzip(str(paths[0])) == gzipped
    got = [pf.parse_record(raw, "laion400m") for _, raw in pf.iter_part_lines(str(paths[0]))]
    assert got == records


def test_truncated_gzip_part_keeps_the_good_lines_then_raises(tmp_path):
    path = tmp_path / "p.gz"
    with gzip.open(path, "wb") as f:
        for i in range(200):
            f.write(pf.encode_record(f"c{i}", os.urandom(300)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(pf.RecordError) as e:
        for n, raw in pf.iter_part_lines(str(path)):
            seen.append(pf.parse_record(raw, "laion400m")[0])
    assert e.value.reason == "truncated_part" and str(path) in str(e.value)
    assert 0 < len(seen) < 200 and seen == [f"c{i}" for i in range(len(seen))]


@pytest.mark.parametrize("line,reason", [
    (b"only one field\n", "bad_fields"),
    (b"cap\tNONE\t!!notbase64!!\n", "bad_base64"),
    (b"cap\tNONE\t\n", "bad_base64"),
    (b"\xff\xfe\tNONE\tAAAA\n", "bad_encoding"),
    (b"cap\tNONE\t\xff\xfeAAAA\n", "bad_base64"),  # only text fields are decoded as text
    (b"cap\tNONE\tAAAA=AAA\n", "bad_base64"),  # strict: nothing after padding
    (b"cap\tNONE\tAA AA\n", "bad_base64"),
])
def test_bad_laion400m_lines_have_reasons(line, reason):
    with pytest.raises(pf.RecordError) as e:
        pf.parse_record(line, "laion400m")
    assert e.value.reason == reason


def test_gb18030_fallback():
    caption = "中文标题".encode("gb18030")
    with pytest.raises(UnicodeDecodeError):
        caption.decode("utf-8")  # the fallback is what decodes it
    assert pf.parse_record(caption + b"\tNONE\tAAAA\n", "laion400m") == ("中文标题", base64.b64decode("AAAA"))


def test_laion_aes_caption_fallback_and_errors():
    b64 = base64.b64encode(b"img").decode()
    line = "\t".join(["u", "x", json.dumps({"blip_caption_en": "a cat"}), "3", "4", b64]).encode()
    assert pf.parse_record(line, "laion_aes") == ("a cat", b"img")
    line = "\t".join(["u", "x", json.dumps({"caption_en": "a dog", "blip_caption_en": "no"}), "3", "4", b64])
    assert pf.parse_record(line.encode(), "laion_aes")[0] == "a dog"
    for bad, reason in [("\t".join(["u", "x", "{", "3", "4", b64]), "bad_json"),
                        ("\t".join(["u", "x", "{}", "3", "4", b64]), "no_caption"),
                        ("a\tb\tc", "bad_fields")]:
        with pytest.raises(pf.RecordError) as e:
            pf.parse_record(bad.encode(), "laion_aes")
        assert e.value.reason == reason


def test_filelist_list_weights_relative_paths_and_errors(tmp_path):
    (tmp_path / "parts").mkdir()
    part = tmp_path / "parts" / "part-000001"
    part.write_bytes(pf.encode_record("c", b"x"))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.filelist").write_text("../parts/part-000001\n\n# comment\n../parts/part-000001\n")
    top = tmp_path / "all.filelist.list"
    top.write_text("lists/a.filelist 0.7\n")
    (src,) = fl.read_filelist_list(str(top))
    assert src.weight == 0.7 and src.parts == (str(part), str(part))  # repeats are kept (num_repeat)
    top.write_text("lists/a.filelist zero\n")  # not a number: part of the path, and the error says so
    with pytest.raises(FileNotFoundError, match=r"all.filelist.list:1: .*'zero' is not a number"):
        fl.read_filelist_list(str(top))
    top.write_text("lists/missing.filelist\n")
    with pytest.raises(FileNotFoundError, match="missing.filelist"):
        fl.read_filelist_list(str(top))
    (tmp_path / "lists" / "a.filelist").write_text("../parts/part-000009\n")
    top.write_text("lists/a.filelist\n")
    with pytest.raises(FileNotFoundError, match="part-000009"):
        fl.read_filelist_list(str(top))


def test_format_comes_from_argument_or_manifest_never_the_name(tmp_path):
    out = tmp_path / "laion_aes_lookalike"
    (out / "filelist").mkdir(parents=True)
    filelist = out / "filelist" / "laion_aes.filelist"
    filelist.write_text("")
    assert fl.data_format_of(str(filelist), None) == "laion400m"  # no manifest: the default, not the name
    (out / "laion_aes.manifest.json").write_text(json.dumps({"format_version": 1, "data_format": "laion_aes"}))
    assert fl.data_format_of(str(filelist), None) == "laion_aes"
    assert fl.data_format_of(str(filelist), "laion400m") == "laion400m"
    with pytest.raises(ValueError, match="--data_format"):
        fl.data_format_of(str(filelist), "webdataset")
    assert pf.part_index("part-000012.gz.tmp") == 12 and pf.part_index("notes.txt") is None
