"""How every stage turns a command line into its configuration: parse, resolve, save.

- Each stage declares its flags once, as typed dataclasses whose fields carry help text and whose
  __post_init__ validates them (one line naming the flag on a bad value). The command line is generated from
  them by paddlenlp's PdArgumentParser, as the reference's train_txt2img_laion400m_trainer.py does.
- Parsed arguments are never changed afterwards. What a run derives from them and from the machine (component
  paths, the device's precision, defaults that depend on the core count, notices) is computed by the stage's
  resolve step into a new, frozen object.
- That resolved object is what runs, what is logged, and what is saved as JSON beside the outputs
  (`save_config`), so what is printed is what ran.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import os
import sys
from typing import Any, List, Optional, Sequence

from data_tools.fileio import write_json_atomic


def _pd_argument_parser_class() -> type:
    """paddlenlp's PdArgumentParser. Its module (paddlenlp/trainer/argparser.py) needs only the standard library,
    but importing it through the package imports all of paddlenlp and paddle: ~6 s before a data tool can even
    print --help (measured here: 6.1 s vs 0.05 s). Stages that do not otherwise need paddle load that one module
    from paddlenlp's installed files; when paddlenlp is already imported, its own module is used."""
    loaded = sys.modules.get("paddlenlp.trainer.argparser")
    if loaded is not None:
        return loaded.PdArgumentParser
    spec = importlib.util.find_spec("paddlenlp")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("paddlenlp is not installed: run bash scripts/setup.sh")
    path = os.path.join(list(spec.submodule_search_locations)[0], "trainer", "argparser.py")
    module_spec = importlib.util.spec_from_file_location("_sd_pd_argparser", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.PdArgumentParser


def build_parser(dataclass_types: Sequence[type], **kwargs):
    """The stage's command line, generated from its dataclasses by paddlenlp's PdArgumentParser."""
    return _pd_argument_parser_class()(list(dataclass_types), **kwargs)


def parse_args(dataclass_types: Sequence[type], argv: Optional[List[str]] = None, **parser_kwargs):
    """The dataclasses of an entry point from command-line flags (default sys.argv[1:]), or from a single .json
    argument holding them (as paddlenlp's own scripts accept). `parser_kwargs` go to the parser (prog, ...)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(dataclass_types, **parser_kwargs)
    if len(argv) == 1 and argv[0].endswith(".json"):
        path = os.path.abspath(argv[0])
        try:
            return parser.parse_json_file(path)
        except json.JSONDecodeError as e:  # name the file: the decoder's message names only a line and column
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    return parser.parse_args_into_dataclasses(args=argv)


def to_jsonable(obj: Any) -> Any:
    """A resolved config as plain JSON values: dataclasses by field (init and derived fields alike), enums by
    value, tuples as lists. paddlenlp's TrainingArguments goes through its own to_dict (it hides tokens)."""
    if dataclasses.is_dataclass(obj) and callable(getattr(obj, "to_dict", None)):
        return {k: to_jsonable(v) for k, v in obj.to_dict().items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def save_config(path: str, resolved: Any) -> str:
    """Write a resolved config as JSON (atomically); returns the path."""
    write_json_atomic(path, to_jsonable(resolved))
    return path


def format_config(resolved: Any) -> str:
    """One JSON block for the log: the resolved config, as saved."""
    return json.dumps(to_jsonable(resolved), ensure_ascii=False, sort_keys=True, indent=1)
