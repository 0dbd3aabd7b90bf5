"""The one example schema, and the pure mapping of a source record onto it.

Schema (``examples.parquet``)::

    id           str   stable: the source's own id, or derived from the content
    source       str   the source's name in the config
    task         str   defaults to the source name
    instruction  str   non-empty
    input        str   may be ""
    output       str   non-empty
    messages     list<struct<role: str, content: str>> | null   (multi-turn sources)
    quality      float | null   (when the source maps a quality field; a numeric string
                                 such as a CSV cell "0.5" is converted, anything else rejected)

No I/O here: readers hand records in, this module says "example" or "reject,
because ...". The reasons are a closed set (``RejectReason``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyarrow as pa

from mixray.config import FieldMap


class RejectReason(str, Enum):
    UNPARSEABLE = "unparseable"  # not valid JSON / CSV / cut off mid-record
    NOT_AN_OBJECT = "not_an_object"  # a JSON value that is not an object
    INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8
    MISSING_FIELD = "missing_field"  # a required field is absent
    EMPTY_FIELD = "empty_field"  # a required field is empty or whitespace
    WRONG_TYPE = "wrong_type"  # a field has the wrong type
    BAD_CONVERSATION = "bad_conversation"  # no user turn followed by an assistant turn
    DUPLICATE_ID = "duplicate_id"  # the source's own id was seen before
    EXACT_DUPLICATE = "exact_duplicate"  # same instruction/input/output (only if dropping)


EXAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("quality", pa.float64()),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),  # 1-based line where the record starts (null if not line-based)
        ("row", pa.int64()),  # 1-based record number within the file
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),  # the offending record, cut to 2,000 characters
    ]
)

_ROLE = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Rejected:
    reason: RejectReason
    detail: str


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        self.reason, self.detail = reason, detail


def _has_surrogates(text: str) -> bool:
    # Readers decode with errors="surrogateescape": undecodable bytes become lone surrogates.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(record: dict[str, Any], key: str, schema_field: str, required: bool) -> str:
    if key not in record or record[key] is None:
        if required:
            raise _Reject(RejectReason.MISSING_FIELD, f"field {key!r} ({schema_field}) is missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise _Reject(
            RejectReason.WRONG_TYPE,
            f"field {key!r} ({schema_field}) must be a string, got {type(value).__name__}",
        )
    if _has_surrogates(value):
        raise _Reject(RejectReason.INVALID_UTF8, f"field {key!r} ({schema_field}) is not valid UTF-8")
    if required and not value.strip():
        raise _Reject(RejectReason.EMPTY_FIELD, f"field {key!r} ({schema_field}) is empty")
    return value


# A decimal number as text (CSV cells, some JSON exports): "0.5", " 3 ", "-1e-3", "+.5".
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$", re.ASCII)


def _own_id(record: dict[str, Any], key: str) -> str:
    raw_id = record.get(key)
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raise _Reject(RejectReason.MISSING_FIELD, f"field {key!r} (id) is missing or empty")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise _Reject(RejectReason.WRONG_TYPE,
                      f"field {key!r} (id) must be a string or integer, got {type(raw_id).__name__}")
    if isinstance(raw_id, str) and _has_surrogates(raw_id):
        raise _Reject(RejectReason.INVALID_UTF8, f"field {key!r} (id) is not valid UTF-8")
    return str(raw_id)


def _quality(record: dict[str, Any], key: str) -> float:
    """The quality field as a finite float; a numeric string is converted (its declared type)."""
    q = record.get(key)
    if isinstance(q, str):
        if _has_surrogates(q):
            raise _Reject(RejectReason.INVALID_UTF8, f"field {key!r} (quality) is not valid UTF-8")
        if not q.strip():
            q = None
        elif _NUMBER.match(q):
            q = float(q)
    if q is None:
        raise _Reject(RejectReason.MISSING_FIELD, f"field {key!r} (quality) is missing")
    if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q):
        raise _Reject(RejectReason.WRONG_TYPE,
                      f"field {key!r} (quality) must be a finite number, got {_show(q)}")
    return float(q)


def _show(value: Any, n: int = 60) -> str:
    """A short repr of a received value for a reject's detail."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _messages(record: dict[str, Any], key: str) -> list[dict[str, str]]:
    if key not in record or record[key] is None:
        raise _Reject(RejectReason.MISSING_FIELD, f"field {key!r} (conversations) is missing")
    turns = record[key]
    if not isinstance(turns, list):
        raise _Reject(
            RejectReason.WRONG_TYPE, f"field {key!r} must be a list of turns, got {type(turns).__name__}"
        )
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Reject(RejectReason.WRONG_TYPE, f"{key}[{i}] must be an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role.lower() not in _ROLE:
            raise _Reject(RejectReason.WRONG_TYPE, f"{key}[{i}] has unknown role {role!r}")
        if not isinstance(content, str):
            raise _Reject(
                RejectReason.WRONG_TYPE, f"{key}[{i}] content must be a string, got {type(content).__name__}"
            )
        if _has_surrogates(content):
            raise _Reject(RejectReason.INVALID_UTF8, f"{key}[{i}] is not valid UTF-8")
        out.append({"role": _ROLE[role.lower()], "content": content})
    return out


def _first_exchange(messages: list[dict[str, str]], key: str) -> tuple[str, str]:
    for i in range(len(messages) - 1):
        user, reply = messages[i], messages[i + 1]
        if user["role"] == "user" and reply["role"] == "assistant":
            if user["content"].strip() and reply["content"].strip():
                return user["content"], reply["content"]
    raise _Reject(
        RejectReason.BAD_CONVERSATION,
        f"{key}: no non-empty user turn followed by a non-empty assistant turn",
    )


def content_key(instruction: str, input_: str, output: str, messages: list | None) -> str:
    """sha256 over the example's content: equal iff the examples are exact duplicates."""
    h = hashlib.sha256()
    for part in (instruction, input_, output):
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    if messages:
        h.update(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def map_record(
    record: Any, fields: FieldMap, source: str, task: str
) -> dict[str, Any] | Rejected:
    """Map one parsed source record onto the schema (without ``id``; see ``assign_id``).

    Returns the example dict, or ``Rejected(reason, detail)``. The returned dict
    carries ``_own_id`` (the source's own id, or None) and ``_key`` (content hash)
    for the id/duplicate bookkeeping done by the caller.
    """
    try:
        if not isinstance(record, dict):
            raise _Reject(RejectReason.NOT_AN_OBJECT, f"expected an object, got {type(record).__name__}")
        messages = None
        if fields.conversations:
            messages = _messages(record, fields.conversations)
            instruction, output = _first_exchange(messages, fields.conversations)
            input_ = ""
        else:
            instruction = _text(record, fields.instruction, "instruction", required=True)
            input_ = _text(record, fields.input, "input", required=False) if fields.input else ""
            output = _text(record, fields.output, "output", required=True)
        own_id = _own_id(record, fields.id) if fields.id else None
        quality = _quality(record, fields.quality) if fields.quality else None
    except _Reject as r:
        return Rejected(r.reason, r.detail)
    return {
        "source": source,
        "task": task,
        "instruction": instruction,
        "input": input_,
        "output": output,
        "messages": messages,
        "quality": quality,
        "_own_id": own_id,
        "_key": content_key(instruction, input_, output, messages),
    }


def derived_id(source: str, key: str, occurrence: int) -> str:
    """Content-derived id: ``<source>/<16 hex of the content hash>``, ``-<n>`` for the n-th copy.

    The same data gives the same ids, whatever the order of other records.
    (A source's own id becomes ``<source>/<own id>``.)
    """
    base = f"{source}/{key[:16]}"
    return base if occurrence == 1 else f"{base}-{occurrence}"
