"""Records fscr reads back (manifests, journals, origins, job files, streams' headers, other
programs' reports): one schema library for all of them, msgspec.

Each record is a frozen msgspec Struct whose fields are typed and constrained (`Meta`);
`decode` (JSON) and `convert` (objects from TOML or a journal line) are strict: no extra
field, no coercion (a string is never taken for a number), every constraint checked.
Patterns (`Meta(pattern=...)`) are matched with Python's re.search: anchor them with ^ and
backslash-Z, never $, which also matches before a final newline. A Struct built in Python is
not checked by msgspec; `checked` validates one that fscr made itself before it is written
(a path that is not UTF-8, a description too long).

msgspec, not pydantic: a restore's start-up is its wall time (docs/benchmarks.md), and
msgspec imports and builds these types in a few milliseconds where pydantic took ~90 ms.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta, Struct, field

from .names import ID_PATTERN

__all__ = ["Id", "Invalid", "Meta", "PathText", "Record", "Struct", "checked", "convert",
           "decode", "encode", "field", "plain", "replace", "why"]

T = TypeVar("T")

# What a failed decode or validation raises (ValidationError is a DecodeError).
Invalid = msgspec.DecodeError


# Field types several records share.
Id = Annotated[str, Meta(pattern=rf"^{ID_PATTERN}\Z")]  # a checkpoint id; a job's name
PathText = Annotated[str, Meta(min_length=1, max_length=4096)]  # a path fscr passes on


class Record(Struct, frozen=True, forbid_unknown_fields=True):
    """A record fscr reads back: frozen, and a field it does not know is an error (both are
    inherited; `kw_only=True`, for a field with a default before one without, is not)."""


def decode(raw: bytes | str, into: type[T]) -> T:
    """JSON into `into`, strictly; raises Invalid."""
    return msgspec.json.decode(raw, type=into, strict=True)


def convert(obj: Any, into: type[T]) -> T:
    """Python objects (a parsed TOML table, a journal line) into `into`; raises Invalid."""
    return msgspec.convert(obj, type=into, strict=True)


def encode(rec: Any, indent: int = 0) -> bytes:
    raw = msgspec.json.encode(rec)
    return msgspec.json.format(raw, indent=indent) if indent else raw


def plain(rec: Any) -> Any:
    """A record as dicts, lists and scalars (for --json output and journal payloads)."""
    return msgspec.to_builtins(rec)


def replace(rec: T, **changes: Any) -> T:
    """A copy of `rec` with `changes` (records are frozen)."""
    return msgspec.structs.replace(rec, **changes)


def checked(rec: T) -> T:
    """`rec`, made in Python, validated by writing and reading it back; raises Invalid."""
    try:
        raw = msgspec.json.encode(rec)
    except UnicodeEncodeError as e:  # a str no JSON can hold (a name that is not UTF-8)
        bad = e.object[e.start:e.end] if isinstance(e.object, str) else ""
        raise msgspec.ValidationError(f"a string is not UTF-8 (at {bad!r})") from None
    return msgspec.json.decode(raw, type=type(rec), strict=True)


_AT = re.compile(r" - at `\$(.*)`$")


def why(e: Exception) -> tuple[str, str]:
    """(where, what) of a failed decode: where as a dotted path ("volumes.0.path", "(top)"),
    what as msgspec says it ("Expected `int`, got `str`"). Any other error (a record's own
    check): ("(top)", its message)."""
    text = str(e)
    m = _AT.search(text)
    if m is None:
        return "(top)", text
    where = re.sub(r"\[(\d+)\]", r".\1", m.group(1)).lstrip(".")
    return where or "(top)", text[:m.start()]
