"""sd/config.py: every stage's parse -> resolve -> save convention."""
import dataclasses
import enum
import json
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import pytest

from helpers import PY, ROOT
from sd.config import build_parser, format_config, parse_args, save_config, to_jsonable


class Color(enum.Enum):
    RED = "red"


@dataclass
class Args:
    name: str = field(metadata={"help": "a required flag"})
    sizes: List[int] = field(default_factory=lambda: [1, 2], metadata={"help": "several values"})
    flag: bool = field(default=False, metadata={"help": "a bare boolean"})
    limit: Optional[int] = None

    def __post_init__(self):
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")


@dataclass(frozen=True)
class Resolved:
    args: Args
    color: Color
    pair: Tuple[int, int]


@pytest.mark.unit
def test_flags_are_generated_from_the_fields(tmp_path):
    (a,) = parse_args([Args], ["--name", "x", "--sizes", "3", "4", "--flag"])
    assert a == Args("x", [3, 4], True, None)
    (b,) = parse_args([Args], ["--name", "y", "--flag", "False", "--limit", "5"])
    assert not b.flag and b.limit == 5
    with pytest.raises(ValueError, match="--limit must be >= 0"):
        parse_args([Args], ["--name", "z", "--limit", "-1"])
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"name": "from-json", "flag": True}))
    (c,) = parse_args([Args], [str(path)])  # a single .json argument holds the flags
    assert c.name == "from-json" and c.flag
    assert "--sizes" in build_parser([Args]).format_help()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        parse_args([Args], [str(bad)])


@pytest.mark.unit
def test_resolved_config_saves_as_plain_json(tmp_path):
    resolved = Resolved(Args("x"), Color.RED, (1, 2))
    assert to_jsonable(resolved) == {"args": {"name": "x", "sizes": [1, 2], "flag": False, "limit": None},
                                     "color": "red", "pair": [1, 2]}
    path = save_config(str(tmp_path / "c.json"), resolved)
    assert json.loads(open(path).read()) == json.loads(format_config(resolved))
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.color = None


@pytest.mark.smoke
def test_a_stage_that_needs_no_paddle_parses_without_importing_it():
    """The data tool's --help must not pay paddle's import (seconds) for its parser."""
    code = ("import sys; from sd.config import parse_args; from data_tools.create_config import CreateDataArguments;"
            "parse_args([CreateDataArguments], ['--input_path', 'a.jsonl', '--output_path', 'o']);"
            "print(sorted(m for m in ('paddle', 'paddlenlp') if m in sys.modules))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
