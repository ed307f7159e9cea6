"""eval.py's prompt files: .txt/.csv/.tsv read as documented, and hostile files are one clear error naming the
file (or a counted skip), never a traceback or a hang."""
import os

import pytest

from sd.eval.evaluation import MAX_PROMPT_BYTES, read_prompts


@pytest.mark.unit
def test_read_prompts_txt_csv_tsv(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert read_prompts(str(txt)) == (["a red circle", "a blue square"], {"blank": 1, "over_long": 0})
    csv_file = tmp_path / "coco.csv"
    csv_file.write_text('id,caption_en\n1,"a cat, on a mat"\n2,\n3,"say ""hi"""\n', encoding="utf-8")
    assert read_prompts(str(csv_file), "caption_en") == (["a cat, on a mat", 'say "hi"'],
                                                         {"blank": 1, "over_long": 0})
    tsv = tmp_path / "coco30k.tsv"
    tsv.write_text("caption_en\tid\na dog, running\t1\n", encoding="utf-8")
    assert read_prompts(str(tsv), "caption_en") == (["a dog, running"], {"blank": 0, "over_long": 0})
    # --prompt_format overrides the extension (generate_images.py reads any --file as tab-separated).
    plain = tmp_path / "coco_captions"
    plain.write_text("caption_en\tid\na cat\t1\n", encoding="utf-8")
    assert read_prompts(str(plain), "caption_en", "tsv")[0] == ["a cat"]
    with pytest.raises(ValueError, match=r"no column 'caption'.*caption_en"):
        read_prompts(str(csv_file), "caption")
    with pytest.raises(ValueError, match="pass --prompt_column"):
        read_prompts(str(csv_file))
    with pytest.raises(ValueError, match="needs a .csv or .tsv"):
        read_prompts(str(txt), "caption_en")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(str(tmp_path / "nope.txt"))


# Hostile prompt files: (file name, bytes, column, the one-line error expected). Each is read in-process (quick)
# and a few through the real entry below (one line on stderr, no traceback).
HOSTILE_PROMPT_FILES = [
    ("latin1.txt", "a red circle\ncaf\xe9 au lait\n".encode("latin-1"), None,
     r"latin1.txt: not UTF-8 at byte offset 16 \(line 2\)"),
    ("gb18030.tsv", "caption_en\n中文\n".encode("gb18030"), "caption_en", "gb18030.tsv: not UTF-8 at byte offset 11"),
    ("nul.txt", b"a red circle\nbad\x00prompt\n", None, r"nul.txt: NUL byte at byte offset 16 \(line 2\)"),
    ("utf16.txt", "a red circle\n".encode("utf-16"), None, "utf16.txt: NUL byte at byte offset 3"),
    ("empty.txt", b"", None, r"empty.txt: no prompts \(skipped: \{'blank': 0, 'over_long': 0\}\)"),
    ("blank.txt", b"\n  \n\r\n", None, "blank.txt: no prompts .*'blank': 3"),
    ("empty.csv", b"", "caption_en", "empty.csv is empty: no header row with a column 'caption_en'"),
    ("nocol.csv", b"id,text\n1,a cat\n", "caption_en", r"nocol.csv: no column 'caption_en'; columns: \['id', 'text'\]"),
    # An unterminated quote swallows the rest of the file into one field, past csv's 128 KiB field limit.
    ("quote.csv", b'caption_en\n"never closed\n' + b"more text\n" * 20000, "caption_en",
     "quote.csv: malformed table"),
    ("binary.txt", bytes(range(256)) * 4, None, "binary.txt: NUL byte at byte offset 0"),
]


@pytest.mark.unit
@pytest.mark.parametrize("name,data,column,msg", HOSTILE_PROMPT_FILES, ids=[h[0] for h in HOSTILE_PROMPT_FILES])
def test_hostile_prompt_file_is_one_clear_error(tmp_path, name, data, column, msg):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=msg):
        read_prompts(str(tmp_path / name), column)


@pytest.mark.unit
def test_prompt_file_oddities_that_are_read(tmp_path):
    """Over-long lines are skipped and counted (a 5 MB line is never held whole); a byte-order mark, CRLF line
    ends and a non-ASCII prompt are read; a folder or a FIFO is refused at once (no hang)."""
    long = tmp_path / "long.txt"
    with open(long, "wb") as f:
        f.write(b"a red circle\n" + b"x" * (5 << 20) + b"\n" + b"y" * (MAX_PROMPT_BYTES + 1) + b"\r\n"
                + "ein grünes Dreieck\r\n".encode() + b"z" * (MAX_PROMPT_BYTES + 10))  # last line: no newline
    assert read_prompts(str(long)) == (["a red circle", "ein grünes Dreieck"], {"blank": 0, "over_long": 3})
    exact = tmp_path / "exact.txt"
    exact.write_bytes(b"w" * MAX_PROMPT_BYTES + b"\n")
    assert read_prompts(str(exact))[0] == ["w" * MAX_PROMPT_BYTES]  # the cap itself is allowed
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffcaption_en,id\r\n\"a cat\",1\r\n".encode("utf-8"))
    assert read_prompts(str(bom), "caption_en")[0] == ["a cat"]
    big_cell = tmp_path / "cell.csv"
    big_cell.write_bytes(b'caption_en\n"' + (b"x" * 1000 + b"\n") * 70 + b'"\nok\n')  # a quoted cell over the cap
    assert read_prompts(str(big_cell), "caption_en") == (["ok"], {"blank": 0, "over_long": 1})
    with pytest.raises(IsADirectoryError, match="--prompt_file .* is a folder, not a file"):
        read_prompts(str(tmp_path))
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="fifo.txt is not a regular file"):
        read_prompts(str(fifo))
