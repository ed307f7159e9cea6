"""The one home of atomic writes and file digests, for every stage (data tool, loader, trainer, eval).

A reader (a loader, a resumed run, another node on shared storage) must never see a half-written filelist,
manifest, index or config: everything is written to a temporary name beside the target, fsynced, then renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from typing import IO, Any, Iterator


@contextmanager
def atomic_writer(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file that appears under `path` complete or not at all. On an exception in the body the temporary
    file is removed and the exception propagates; the old `path`, if any, is untouched."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer mode must be 'wb' or 'w', got {mode!r}")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when the body raised: leave no debris
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> None:
    with atomic_writer(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
