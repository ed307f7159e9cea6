"""The committed CLIP tokenizer (sd/tiny_init/tokenizer/, built by sd/tiny/build_tokenizer.py)."""
import glob
import gzip
import os
import zipfile

import numpy as np
import pytest
from paddlenlp.transformers import CLIPTokenizer
from paddlenlp.transformers.clip.tokenizer import bytes_to_unicode as paddlenlp_bytes_to_unicode

from sd.components import set_tokenizer_max_length
from sd.tiny.build_tiny_init import TinyInitConfig
from sd.tiny.build_tokenizer import (MODEL_MAX_LENGTH, NUM_MERGES, VOCAB_SIZE, WHEEL_MEMBER, build_tokenizer,
                                        bytes_to_unicode, read_bpe_text)
from sd.tiny.make_demo_data import COLORS, POSITIONS, SHAPES, caption_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "sd", "tiny_init", "tokenizer")
BOS_ID, EOS_ID = 49406, 49407
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _find_bpe_source():
    """The merge list, if this machine has it: $CLIP_BPE_FILE, else a wheel or .txt.gz kept in .cache/ (ignored
    by git; fetch it with `pip download --no-deps open-clip-torch -d .cache`)."""
    env = os.environ.get("CLIP_BPE_FILE")
    if env:
        return env
    found = sorted(glob.glob(os.path.join(ROOT, ".cache", "bpe_simple_vocab_16e6.txt.gz")) +
                   glob.glob(os.path.join(ROOT, ".cache", "open_clip_torch-*.whl")))
    return found[0] if found else None


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.mark.unit
def test_reference_prompt_ids(tok):
    ids = tok("a photo of an astronaut riding a horse on mars")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert tok.decode(ids[1:-1]) == "a photo of an astronaut riding a horse on mars"


@pytest.mark.unit
def test_vocab_layout(tok):
    vocab = tok.get_vocab()
    assert len(vocab) == VOCAB_SIZE == len(tok)
    byte_chars = list(paddlenlp_bytes_to_unicode().values())
    assert list(bytes_to_unicode().values()) == byte_chars  # our copy of GPT-2's map is paddlenlp's, in order
    assert [vocab[c] for c in byte_chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in byte_chars] == list(range(256, 512))
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    # SD v1's tokenizer pads to 77; the tiny default's to 16 (build_tiny_init --model_max_length).
    assert MODEL_MAX_LENGTH == 77 and tok.model_max_length == TinyInitConfig().model_max_length == 16
    assert tok.pad_token_id == EOS_ID and tok.bos_token_id == BOS_ID
    assert len(tok.bpe_ranks) == NUM_MERGES


@pytest.mark.unit
def test_padded_and_truncated_batch(tok):
    long_caption = " ".join(["colorful"] * 120)
    batch = tok(["a red circle at the top left", long_caption], padding="max_length", truncation=True,
                max_length=tok.model_max_length, return_tensors="np")
    ids = np.asarray(batch["input_ids"])
    assert ids.shape == (2, 16)
    short = ids[0].tolist()
    n = short.index(EOS_ID)
    assert short[0] == BOS_ID and n == 8 and short[n:] == [EOS_ID] * (16 - n)  # padded with <|endoftext|>
    assert ids[1, 0] == BOS_ID and ids[1, -1] == EOS_ID  # truncated: eos kept at the end
    assert EOS_ID not in ids[1, 1:-1].tolist()


@pytest.mark.unit
def test_demo_captions_have_no_unknown_tokens(tok):
    vocab = tok.get_vocab()
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                caption = caption_for(color, shape, position)
                tokens = tok.tokenize(caption)
                assert all(t in vocab for t in tokens), caption
                ids = tok(caption)["input_ids"]
                # <|endoftext|> doubles as unk: it may only appear as the final eos.
                assert ids[0] == BOS_ID and ids[-1] == EOS_ID and EOS_ID not in ids[1:-1], caption
                assert tok.decode(ids[1:-1]) == caption


@pytest.mark.unit
def test_bad_bpe_file_is_named(tmp_path):
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="short.txt.gz: 3 merge lines after the header"):
        build_tokenizer(str(short), str(tmp_path / "out"))
    not_wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(not_wheel, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(ValueError, match="without open_clip/bpe_simple_vocab_16e6.txt.gz"):
        read_bpe_text(str(not_wheel))
    with pytest.raises(FileNotFoundError, match="--bpe_file not found"):
        read_bpe_text(str(tmp_path / "missing.gz"))


@pytest.mark.unit
def test_rebuild_is_byte_identical(tmp_path):
    source = _find_bpe_source()
    if source is None:
        pytest.skip("no CLIP merge list on this machine: set CLIP_BPE_FILE or run "
                    "`pip download --no-deps open-clip-torch -d .cache` to test the rebuild")
    if zipfile.is_zipfile(source):  # the brief's input is the .txt.gz: take it out of the wheel
        gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
        with zipfile.ZipFile(source) as zf:
            gz.write_bytes(zf.read(WHEEL_MEMBER))
        source = str(gz)
    out = build_tokenizer(source, str(tmp_path / "tokenizer"))
    set_tokenizer_max_length(out, TinyInitConfig().model_max_length)  # what build_tiny_init does to it
    for name in FILES:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(TOKENIZER_DIR, name), "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(TOKENIZER_DIR)) == sorted(FILES)
