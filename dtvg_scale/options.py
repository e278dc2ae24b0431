"""What every option section is made of: ``option`` (a dataclass field with its help text and
the ``Range`` it accepts) and ``ConfigError``, the one error of a bad option. The sections live
beside what they configure (``runtime.options``: backbone, prompt, loop; ``data.options``: the
tasks); ``recipes.config`` makes the job's ``Config`` of them, reads YAML and ``key=value``
overrides and checks every ``Range`` once."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad option: raised before any model is loaded."""


@dataclass(frozen=True)
class Range:
    """The values an option accepts, checked once where options are built (``build_config``).
    ``low``/``high`` bound numbers (``open_low``: strictly above ``low``); ``path`` is
    ``"folder"`` (must be an existing folder) or ``"not_file"`` (a folder or nothing yet)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    path: str | None = None

    def accepts(self, value: Any) -> bool:
        if self.path == "folder":
            return Path(str(value)).expanduser().is_dir()
        if self.path == "not_file":
            return not Path(str(value)).expanduser().is_file()
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self, annotation: Any) -> str:
        if self.path == "folder":
            return "an existing folder"
        if self.path == "not_file":
            return "a folder (existing or new), not a file"
        kind = type_words(annotation, or_null=False)  # the caller says "or null" after the range
        if self.low is not None and self.high is not None:
            return f"{kind} in [{self.low:g}, {self.high:g}]"
        return f"{kind} {'>' if self.open_low else '>='} {self.low:g}"


def type_words(annotation: Any, or_null: bool = True) -> str:
    """What an option of this type takes, in words: ``int | None`` -> "an integer or null" (with
    ``or_null=False``: "an integer"), ``float`` -> "a number", ``list[str]`` -> "a list"."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    plain = next((a for a in args if a is not type(None)), annotation)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    kind = "a list" if typing.get_origin(plain) is list else words[plain]
    return f"{kind} or null" if or_null and type(None) in args else kind


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = Range(low=1), Range(low=0), Range(low=0, open_low=True)
UNIT_INTERVAL = Range(low=0, high=1)


def option(text: str, check: Range | None = None, **kwargs: Any) -> Any:
    """A dataclass field of an option: its ``--help`` text and the ``Range`` it accepts."""
    return field(metadata={"help": text, "check": check}, **kwargs)
