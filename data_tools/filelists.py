"""The one module that owns the `NAME.filelist` / `NAME.filelist.list` layout and the dataset manifests it points to.

Layout written by create_pretraining_data.py next to the part files (data_tools/part_format.py owns those):

    OUT/filelist/NAME.filelist                   one part path a line
    OUT/filelist/NAME.filelist.list              one filelist path a line, optional weight after a space
    OUT/NAME.manifest.json                       format, counts, parts with sha256

A relative path in either list is looked for in the list's own folder, then in the working folder (the
reference's convention): see resolve_listed. The writer (data_tools/create_data.py), the streaming loader
(trainer/loader/) and the latent datasets (data_tools/latent_format.py) all read lists and manifests through this
module, so the list layout and the manifest check live in one place. It imports the part format's constants
(format version, data formats) from part_format; part_format never imports this module.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

from data_tools.part_format import DATA_FORMATS, FORMAT_VERSION

FILELIST_DIR_NAME = "filelist"

# Where a relative path in a .filelist or .filelist.list is looked for, in this order. Our data tool writes paths
# relative to the list's own folder (or absolute); the reference's create_pretraining_data.py writes them relative
# to the folder the recipe runs from, and its loader opens them from the working folder. The list's folder is
# tried first because it does not depend on where a command runs; the working folder second, so the reference's
# layouts read unchanged. A path found in neither is an error naming both places.
BASE_ABSOLUTE = "absolute"
BASE_LIST_FOLDER = "list folder"
BASE_WORKING_FOLDER = "working folder"
_WEIGHTED_LINE = re.compile(r"^(.*?\S)\s+(\S+)$")
_MAX_LIST_BYTES = 256 << 20  # a list of 1M parts with 200-character paths; anything larger is not a list


def listed_candidates(path: str, naming_file: str) -> List[Tuple[str, str]]:
    """(candidate, base) in the order a path named in `naming_file` is looked for: itself when absolute, else the
    list's own folder, then the working folder."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return [(os.path.normpath(path), BASE_ABSOLUTE)]
    return [(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(naming_file)), path)), BASE_LIST_FOLDER),
            (os.path.normpath(os.path.join(os.getcwd(), path)), BASE_WORKING_FOLDER)]


def resolve_listed(path: str, naming_file: str, line: int, what: str) -> Tuple[str, str]:
    """(absolute path, base used) of a path named on line `line` of `naming_file`: see the order above. A path
    that names no regular file at either place is a FileNotFoundError naming every place tried."""
    path = os.path.expanduser(path)
    tried = listed_candidates(path, naming_file)
    for candidate, base in tried:
        if os.path.isfile(candidate):
            return candidate, base
    places = "; ".join(f"{c} ({b}{': exists but is not a regular file' if os.path.exists(c) else ''})"
                       for c, b in tried)
    raise FileNotFoundError(f"{naming_file}:{line}: {what} not found: {path!r}; tried {places}")


def list_lines(path: str, what: str) -> List[Tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank, non-comment lines of a list file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}" + (" (not a regular file)" if os.path.exists(path) else ""))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(_MAX_LIST_BYTES + 1)
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: cannot read this {what} as UTF-8 text: {e}") from None
    if len(text) > _MAX_LIST_BYTES:
        raise ValueError(f"{path}: this {what} is larger than {_MAX_LIST_BYTES >> 20} MiB; is it really a list?")
    out = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()[:1] not in ("", "#")]
    for n, s in out:
        if "\x00" in s:
            raise ValueError(f"{path}:{n}: NUL byte in a path")
    return out


@dataclass(frozen=True)
class Source:
    """One weighted `.filelist` named by a `.filelist.list`. `base`: how the filelist's own path was found;
    `parts_base`: how its part paths were (one base, or the count of each when they differ)."""

    filelist: str
    weight: float
    parts: Tuple[str, ...]
    base: str = BASE_ABSOLUTE
    parts_base: str = BASE_ABSOLUTE


def _read_filelist(path: str) -> Tuple[List[str], List[str]]:
    parts, bases = [], []
    for n, s in list_lines(path, "filelist"):
        part, base = resolve_listed(s, path, n, "part")
        parts.append(part)
        bases.append(base)
    return parts, bases


def read_filelist(path: str) -> List[str]:
    """Part paths listed by a `.filelist` (blank lines and #-comments ignored), resolved (see resolve_listed)."""
    return _read_filelist(path)[0]


def _summarise_bases(bases: List[str]) -> str:
    counts = Counter(bases)
    return bases[0] if len(counts) == 1 else ", ".join(f"{n} by {b}" for b, n in counts.items()) or "no parts"


def parse_weighted_line(text: str) -> Tuple[str, Optional[str]]:
    """(path, weight token or None) of a `.filelist.list` line `path [weight]`: the last whitespace-separated
    token is the weight when it reads as a number, else it is part of the path (paths may contain spaces)."""
    m = _WEIGHTED_LINE.match(text)
    if m is None:
        return text, None
    try:
        float(m.group(2))
    except ValueError:
        return text, None
    return m.group(1), m.group(2)


def read_filelist_list(path: str) -> List[Source]:
    """Sources of a `.filelist.list`: each line `path/to/x.filelist [weight]`. Missing files, weights that are not
    finite and > 0, and lists that name themselves are errors naming the file and the line."""
    sources = []
    for n, s in list_lines(path, "--file_list"):
        fl_text, weight_text = parse_weighted_line(s)
        weight = 1.0
        if weight_text is not None:
            weight = float(weight_text)
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{path}:{n}: weight must be a finite number > 0, got {weight_text!r}")
        try:
            filelist, base = resolve_listed(fl_text, path, n, "filelist")
        except FileNotFoundError as e:
            last = s.split()[-1]
            hint = (f" (its last token {last!r} is not a number, so it was read as part of the path, not as a "
                    "weight)") if weight_text is None and len(s.split()) > 1 else ""
            raise FileNotFoundError(f"{e}{hint}") from None
        if os.path.samefile(filelist, path):
            raise ValueError(f"{path}:{n}: the list names itself as a filelist")
        parts, bases = _read_filelist(filelist)
        for p in dict.fromkeys(parts):
            if os.path.samefile(p, filelist) or os.path.samefile(p, path):
                raise ValueError(f"{filelist}: lists itself (or its .filelist.list) as a part: {p}")
        sources.append(Source(filelist, weight, tuple(parts), base, _summarise_bases(bases)))
    if not sources:
        raise ValueError(f"{path}: names no filelist")
    if not any(src.parts for src in sources):
        raise ValueError(f"{path}: its filelists list no part files")
    total = sum(src.weight for src in sources)
    if not math.isfinite(total):
        raise ValueError(f"{path}: the weights sum to {total} (each is finite, their sum overflows); scale them "
                         "down: only their ratios matter")
    return sources


# ----------------------------------------------------------------------------------------------- manifest
def manifest_path(output_path: str, output_name: str) -> str:
    return os.path.join(output_path, f"{output_name}.manifest.json")


def manifest_for_filelist(filelist: str) -> Optional[str]:
    """The manifest create_pretraining_data.py wrote beside OUT/filelist/NAME.filelist, if there is one."""
    name = os.path.basename(filelist)
    if not name.endswith(".filelist"):
        return None
    out = os.path.dirname(os.path.dirname(os.path.abspath(filelist)))
    path = manifest_path(out, name[: -len(".filelist")])
    return path if os.path.isfile(path) else None


LATENT_DATA_FORMAT = "sd_latents"  # the datasets of precompute_latents.py (data_tools/latent_format.py)


def read_manifest(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("data_format") == LATENT_DATA_FORMAT:  # data_tools/latent_format.py checks its own version
        return manifest
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if manifest.get("data_format") not in DATA_FORMATS:
        raise ValueError(f"{path}: data_format {manifest.get('data_format')!r} not in {DATA_FORMATS}")
    return manifest


def data_format_of(filelist: str, explicit: Optional[str]) -> str:
    """The format of a source: the explicit argument wins, then the dataset's manifest, else laion400m (the
    reference's default). Never guessed from a file name."""
    m = manifest_for_filelist(filelist)
    found = read_manifest(m)["data_format"] if m else None
    if explicit:
        if explicit not in DATA_FORMATS:
            raise ValueError(f"--data_format {explicit!r} not in {DATA_FORMATS}")
        if found == LATENT_DATA_FORMAT:
            raise ValueError(f"--data_format {explicit}: {filelist} is a latent dataset ({m}), not image parts")
        return explicit
    return found or "laion400m"

