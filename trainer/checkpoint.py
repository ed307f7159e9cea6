"""Checkpoint folders of the recipe: written complete or not at all, verified before a resume, and never in a
format whose loading runs code.

- Written to `checkpoint-N.tmp-<pid>` and renamed to `checkpoint-N` only when complete; the `.complete` marker,
  written last, lists every file with its size and sha256. A resume checks the folder against it and refuses,
  in one line naming the file, anything that differs (a file changed at the same size, one missing, one
  added, a symlink). A killed save leaves only a `.tmp-` folder, which is never resumed and is removed later.
- Resume state is data, not code: RNG and LR-scheduler state as JSON, optimizer and EMA tensors as safetensors.
  Pickled files (`.pdparams`, `.pdopt`, `.pth`, `.bin`, ...) are refused, in a checkpoint and in a model folder,
  unless the user passes TRUST_FLAG: unpickling a file runs whatever code it names.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import paddle

from data_tools.fileio import sha256_file, write_json_atomic

logger = logging.getLogger("sd")

COMPLETE_MARKER = ".complete"
MARKER_FORMAT = "sd_recipe_checkpoint"
TRAINER_STATE_FILE = "trainer_state.json"  # paddlenlp's name; JSON already
OPTIMIZER_FILE = "optimizer.safetensors"
LR_SCHEDULER_FILE = "lr_scheduler.json"
GRAD_SCALER_FILE = "grad_scaler.json"
RNG_FILE = "rng_state.json"
EMA_FILE = "ema_state.safetensors"
TRUST_FLAG = "--trust_pickled_checkpoint"
# Formats torch/paddle write with pickle; an index of one (model_state.pdparams.index.json) points at pickles.
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".pdmodel.pkl", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LEFTOVER_RE = re.compile(r"^checkpoint-(\d+)\.(tmp|old)-\d+$")


class CheckpointError(ValueError):
    """A checkpoint (or model folder) that must not be loaded; the message is one line naming the file."""


def trusts_pickles(args) -> bool:
    """--trust_pickled_checkpoint, declared on SDTrainingArguments (sd/args.py)."""
    return bool(args.trust_pickled_checkpoint)


def is_pickled(name: str) -> bool:
    base = name[:-len(".index.json")] if name.endswith(".index.json") else name
    return base.endswith(PICKLE_SUFFIXES)


def refuse_pickled_weights(folder: str, what: str, trust: bool) -> None:
    """The rule for a model folder (UNet, VAE, text encoder): pickled weights are refused unless trusted, even
    beside safetensors (ppdiffusers prefers a pickled shard index over a single safetensors file)."""
    pickled = sorted(n for n in os.listdir(folder) if is_pickled(n))
    if not pickled:
        return
    if not trust:
        raise CheckpointError(
            f"{what} {folder} holds pickled weights ({', '.join(pickled)}): loading a pickle can run code. Use "
            f"safetensors (save_pretrained(..., safe_serialization=True)), or pass {TRUST_FLAG} for files you made")
    logger.warning("%s: loading pickled weights %s from %s (trusted)", TRUST_FLAG, pickled, folder)


# ------------------------------------------------------------------------------------------ folders
def checkpoint_dirs(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of every checkpoint-N folder, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(output_dir, n))]
    return sorted(found)


def leftovers(output_dir: str) -> List[str]:
    """Folders of killed saves (`checkpoint-N.tmp-PID`) and of replaced checkpoints (`.old-PID`)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, n) for n in os.listdir(output_dir) if LEFTOVER_RE.match(n))


def check_output_dir(output_dir: str) -> None:
    """A `checkpoint-N` entry the recipe did not make (a file, a symlink) is an error, not something to follow
    or to delete."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if CHECKPOINT_RE.match(name) and (os.path.islink(path) or not os.path.isdir(path)):
            kind = "a symlink" if os.path.islink(path) else "not a folder"
            raise CheckpointError(f"{path} is {kind}: the recipe writes checkpoint folders only; remove it")


def complete_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    return [(n, p) for n, p in checkpoint_dirs(output_dir) if os.path.isfile(os.path.join(p, COMPLETE_MARKER))]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint-N whose save finished (has the marker); it is verified before use."""
    done = complete_checkpoints(output_dir)
    for n, path in checkpoint_dirs(output_dir):
        if (n, path) not in done:
            logger.warning("%s has no %s marker: ignored for resume", path, COMPLETE_MARKER)
    return done[-1][1] if done else None


def step_of(path: str) -> Optional[int]:
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def checkpoints_not_continued(output_dir: str, resume: Optional[str]) -> List[str]:
    """The checkpoints of output_dir that a run starting at `resume` does not continue: all of them when it
    starts from scratch or from a checkpoint elsewhere, those after its step when it resumes one of them."""
    here = resume is not None and os.path.realpath(os.path.dirname(os.path.normpath(resume))) == \
        os.path.realpath(output_dir)
    after = step_of(resume) if here else None
    return [p for n, p in checkpoint_dirs(output_dir) if after is None or n > after]


def remove_folders(paths: List[str], why: str) -> None:
    for path in paths:
        logger.warning("removing %s (%s)", path, why)
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------ the marker
def file_table(folder: str, hashes: bool = True) -> Dict[str, dict]:
    """Every regular file under `folder` (the marker excepted), relative path -> size (and sha256). A symlink
    or special file is an error: the recipe writes neither."""
    table: Dict[str, dict] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir)) as it:
            for entry in it:
                rel = os.path.join(rel_dir, entry.name)
                if entry.is_symlink():
                    raise CheckpointError(f"{os.path.join(folder, rel)} is a symlink: a checkpoint holds real "
                                          "files only")
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif not entry.is_file(follow_symlinks=False):
                    raise CheckpointError(f"{os.path.join(folder, rel)} is not a regular file")
                elif rel != COMPLETE_MARKER:
                    table[rel] = {"size": entry.stat(follow_symlinks=False).st_size}
                    if hashes:
                        table[rel]["sha256"] = sha256_file(entry.path)
    return dict(sorted(table.items()))


def write_marker(folder: str, step: int) -> dict:
    """The `.complete` marker: every file of the finished folder with its size and sha256, written last."""
    table = file_table(folder)
    pickled = [rel for rel in table if is_pickled(rel)]
    if pickled:  # refuse at save rather than at the resume that would refuse it
        raise CheckpointError(f"{folder}: the save wrote pickled files {pickled}; a checkpoint must be pickle-free")
    marker = {"format": MARKER_FORMAT, "version": 1, "step": step, "files": table}
    write_json_atomic(os.path.join(folder, COMPLETE_MARKER), marker)
    return marker


def read_marker(path: str) -> Optional[dict]:
    """The marker's content; None for the empty marker of older versions of the recipe."""
    marker_path = os.path.join(path, COMPLETE_MARKER)
    if os.path.islink(marker_path) or not os.path.isfile(marker_path):
        raise CheckpointError(f"{path} is not a checkpoint: no {COMPLETE_MARKER} marker (an interrupted save, or "
                              "not a checkpoint-N folder written by train.py / train_vae.py)")
    if os.path.getsize(marker_path) == 0:
        return None
    marker = read_json(marker_path)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or marker.get("format") != MARKER_FORMAT or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(f"{marker_path} is not a checkpoint marker of this recipe")
    return marker


def verify_checkpoint(path: str, trust: bool, hashes: bool = True) -> None:
    """Refuse, in one line naming the file, a checkpoint that is not exactly what its marker lists (hashes=False:
    names and sizes only, the quick check at start), or that holds pickled files without `trust`."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint folder")
    marker = read_marker(path)
    if marker is None:  # older versions wrote an empty marker: nothing to check the files against
        if not trust:
            raise CheckpointError(f"{os.path.join(path, COMPLETE_MARKER)} lists no files (a checkpoint of an older "
                                  f"version of the recipe, or not one at all): pass {TRUST_FLAG} to resume it "
                                  "unverified, with its pickled state, if you made it")
        logger.warning("%s: resuming %s unverified (its marker lists no files)", TRUST_FLAG, path)
        return
    expected, actual = marker["files"], file_table(path, hashes=False)
    for rel in sorted(set(expected) | set(actual)):
        where = os.path.join(path, rel)
        if rel not in actual:
            raise CheckpointError(f"{where} is missing: its {COMPLETE_MARKER} marker lists it")
        if rel not in expected:
            raise CheckpointError(f"{where} is not listed in its {COMPLETE_MARKER} marker: not written by this save")
        if actual[rel]["size"] != expected[rel]["size"]:
            raise CheckpointError(f"{where} has {actual[rel]['size']} bytes, its marker says "
                                  f"{expected[rel]['size']}: the checkpoint was changed after it was saved")
        if is_pickled(rel) and not trust:
            raise CheckpointError(f"{where} is a pickled file: loading it can run code; pass {TRUST_FLAG} if you "
                                  "made it")
    if TRAINER_STATE_FILE not in expected:
        raise CheckpointError(f"{path} is not a checkpoint: no {TRAINER_STATE_FILE}")
    step = step_of(path)
    if step is not None and marker["step"] != step:
        raise CheckpointError(f"{os.path.join(path, COMPLETE_MARKER)} was written for step {marker['step']}, not "
                              f"{step}: the folder was renamed or copied over")
    if hashes:
        for rel, info in expected.items():
            if sha256_file(os.path.join(path, rel)) != info["sha256"]:
                raise CheckpointError(f"{os.path.join(path, rel)} differs from the file that was saved (sha256 "
                                      "mismatch at the same size): the checkpoint was changed or corrupted; remove it to resume "
                                      "from the one before")


def publish(tmp: str, final: str, step: int) -> None:
    """Marker last, then the complete folder takes its name. A folder already there (a markerless one, or one
    being replaced) is moved aside first and removed after: no moment holds a half-written `final`."""
    write_marker(tmp, step)
    old = None
    if os.path.lexists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk before the save counts as done
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def begin(final: str) -> str:
    """A fresh temporary folder for the checkpoint that will become `final`."""
    tmp = f"{final}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


# ------------------------------------------------------------------------------------------ state as data
def read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None


def _plain(value: Any) -> Any:
    """JSON-able copy of a scheduler/scaler state value (numpy scalars and small arrays included)."""
    if isinstance(value, (np.ndarray, paddle.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {type(value).__name__} as JSON")


def write_state_json(path: str, state: dict, kind: str) -> None:
    write_json_atomic(path, {"format": kind, "state": _plain(state)})


def read_state_json(path: str, kind: str) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != kind or not isinstance(data.get("state"), dict):
        raise CheckpointError(f"{path} is not a {kind} file")
    return data["state"]


def save_tensors(path: str, tensors: Dict[str, Any], meta: dict) -> None:
    from safetensors.paddle import save_file

    save_file({k: v.contiguous() if hasattr(v, "contiguous") else v for k, v in tensors.items()}, path,
              metadata={"json": json.dumps(_plain(meta))})


def load_tensors(path: str) -> Tuple[Dict[str, paddle.Tensor], dict]:
    """Tensors and metadata of a safetensors file; anything else (a pickle renamed, a truncated file) is an
    error naming the file, and nothing in it is executed."""
    from safetensors import safe_open
    from safetensors.paddle import load_file

    try:
        with safe_open(path, framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return load_file(path), meta
    except Exception as e:  # the parser's own error types vary by version; all of them mean "not this format"
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:80]})") \
            from None


def optimizer_to_file(state: dict, path: str, extra: dict) -> None:
    """paddle's optimizer.state_dict(): tensors (top level, or in nested dicts such as master_weights) to
    safetensors; every other value (LR_Scheduler, ...) and `extra` into its JSON metadata."""
    tensors, plain, nested = {}, {}, []
    for key, value in state.items():
        if isinstance(value, paddle.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, paddle.Tensor) for v in value.values()):
            nested.append(key)
            tensors.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            plain[key] = value
    save_tensors(path, tensors, {"format": "sd_optimizer_state", "plain": plain, "nested": nested, "extra": extra})


def optimizer_from_file(path: str) -> Tuple[dict, dict]:
    tensors, meta = load_tensors(path)
    if meta.get("format") != "sd_optimizer_state":
        raise CheckpointError(f"{path} is not an optimizer state file of this recipe")
    state: Dict[str, Any] = dict(meta.get("plain", {}))
    nested = set(meta.get("nested", []))
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        if name and group in nested:
            state.setdefault(group, {})[name] = value
        else:
            state[key] = value
    return state, meta.get("extra", {})


def _generator_state(state) -> dict:
    device, seed, offset, engine = state.__getstate__()
    return {"device": device, "seed": seed, "offset": offset, "engine": bytes(engine).decode("ascii")}


def _to_generator_state(data: dict):
    state = paddle.base.core.GeneratorState.__new__(paddle.base.core.GeneratorState)
    state.__setstate__((int(data["device"]), int(data["seed"]), int(data["offset"]),
                        list(str(data["engine"]).encode("ascii"))))
    return state


def rng_state_now() -> dict:
    """This process's python, numpy and paddle (CPU and device) generator states, as JSON-able data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "cpu": _generator_state(paddle.base.core.default_cpu_generator().get_state()),
            "device": [_generator_state(s) for s in paddle.get_rng_state()]}


def set_rng_state(state: dict, source: str) -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(i) for i in internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                             float(cached)))
        paddle.base.core.default_cpu_generator().set_state(_to_generator_state(state["cpu"]))
        paddle.set_rng_state([_to_generator_state(s) for s in state["device"]])
    except (KeyError, TypeError, ValueError, UnicodeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: not an RNG state of this recipe ({type(e).__name__}: {str(e)[:80]})") \
            from None
