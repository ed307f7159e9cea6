"""Build the real CLIP BPE tokenizer folder (vocab.json, merges.txt, configs) offline from OpenAI's merge list.

The merge list ships as `open_clip/bpe_simple_vocab_16e6.txt.gz` inside the open-clip-torch wheel (PyPI), so the
tokenizer of SD v1 can be rebuilt without a model hub:

    pip download --no-deps open-clip-torch -d /tmp/oc
    python sd/tiny/build_tokenizer.py --bpe_file /tmp/oc/open_clip_torch-*.whl --output_dir sd/tiny_init/tokenizer

Vocabulary, in id order (as OpenAI's simple_tokenizer.py and HF's CLIP vocab.json): the 256 byte characters in
GPT-2's bytes_to_unicode order, the same 256 with `</w>`, one token per merge for the first 48894 merges, then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49408 tokens. The output is loaded by
`paddlenlp.transformers.CLIPTokenizer.from_pretrained(folder)`; every file is written deterministically so that a
rebuild is byte-identical to the committed folder (tests/test_tokenizer.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import gzip
import json
import os
import zipfile
from typing import Dict, List, Tuple

NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps merges[1:49152-256-2+1]: 48894 of the file's 262144 merge lines
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGES_HEADER = "#version: 0.2"  # paddlenlp (like HF) skips the first line of merges.txt
GZIP_MAGIC = b"\x1f\x8b"


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable latin-1 bytes map to themselves, the others
    to 256+n), in the order that defines the first 256 token ids."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_bpe_text(path: str) -> str:
    """The merge list text from the .txt.gz, a plain .txt, or an open-clip-torch wheel (zip) holding it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--bpe_file not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if WHEEL_MEMBER not in zf.namelist():
                raise ValueError(f"{path} is a zip/wheel without {WHEEL_MEMBER}; is it an open-clip-torch wheel?")
            raw = zf.read(WHEEL_MEMBER)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    if raw[:2] == GZIP_MAGIC:  # recognised by content, not by file name
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: merge list is not UTF-8 ({e})") from None


def parse_merges(text: str, source: str) -> List[Tuple[str, str]]:
    """The first NUM_MERGES merges; line 1 of the file is a version header, as in OpenAI's loader."""
    lines = text.split("\n")[1:NUM_MERGES + 1]
    if len(lines) < NUM_MERGES:
        raise ValueError(f"{source}: {len(lines)} merge lines after the header, need {NUM_MERGES}")
    merges = []
    for i, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{i}: a merge line must be two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges: List[Tuple[str, str]]) -> Dict[str, int]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"built {len(tokens)} tokens ({len(vocab)} distinct), expected {VOCAB_SIZE}: "
                         "the merge list is not OpenAI's bpe_simple_vocab_16e6")
    return vocab


def tokenizer_config() -> Dict[str, object]:
    """SD v1's tokenizer settings: 77 tokens, pad with <|endoftext|> (as openai/clip-vit-large-patch14)."""
    return {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "max_len": MODEL_MAX_LENGTH,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def special_tokens_map() -> Dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}


def _write_json(path: str, obj: object, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def build_tokenizer(bpe_file: str, output_dir: str) -> str:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json to output_dir; return it."""
    merges = parse_merges(read_bpe_text(bpe_file), bpe_file)
    vocab = build_vocab(merges)
    os.makedirs(output_dir, exist_ok=True)
    # vocab.json on one line, in id order: ~1 MB, a third less than indented, and a plain dict for any reader.
    _write_json(os.path.join(output_dir, "vocab.json"), vocab, indent=None)
    with open(os.path.join(output_dir, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(MERGES_HEADER + "\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    _write_json(os.path.join(output_dir, "tokenizer_config.json"), tokenizer_config())
    _write_json(os.path.join(output_dir, "special_tokens_map.json"), special_tokens_map())
    return output_dir


@dataclass
class TokenizerArguments:
    bpe_file: str = field(metadata={"help": "bpe_simple_vocab_16e6.txt.gz, or the open-clip-torch wheel that "
                                            "contains it."})
    output_dir: str = field(metadata={"help": "Tokenizer folder to write."})


def main(argv: List[str] | None = None) -> int:
    from sd.config import parse_args

    (args,) = parse_args([TokenizerArguments], argv)
    out = build_tokenizer(args.bpe_file, args.output_dir)
    print(f"wrote a {VOCAB_SIZE}-token CLIP tokenizer to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
