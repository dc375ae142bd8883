"""Turning one raw input record into the texts to tokenize, or into the reason it is skipped.

A long preprocessing job must neither crash on one bad line nor silently drop good ones, so every way a record can
be unusable has a name, and the record is skipped and reported with its file and line:

==================  ===========================================================================================
reason              meaning
==================  ===========================================================================================
``invalid_utf8``    the line is not valid UTF-8, or the text holds a lone surrogate (``"\\ud800"`` escapes)
``invalid_json``    the line does not parse as JSON
``not_an_object``   the line is JSON but not an object (``[...]``, ``"..."``, ``3``)
``missing_key``     a ``--json-keys`` field is absent
``non_string_key``  a ``--json-keys`` field is not a string (null, number, list, object, bool)
``empty_text``      the text is empty or only whitespace
``no_tokens``       the tokenizer produced no tokens for the text
``tokenizer_error`` the tokenizer raised on this text
``read_error``      the file could not be read past this line (corrupt compression, I/O error)
==================  ===========================================================================================

Blank lines (nothing but whitespace between two newlines) carry no data and are counted separately, not as errors.

With several ``--json-keys`` a record is kept only if every key is usable, so document ``i`` of each key's output
comes from the same input record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NON_STRING_KEY = "non_string_key"
EMPTY_TEXT = "empty_text"
NO_TOKENS = "no_tokens"
TOKENIZER_ERROR = "tokenizer_error"
READ_ERROR = "read_error"

REASONS = (INVALID_UTF8, INVALID_JSON, NOT_AN_OBJECT, MISSING_KEY, NON_STRING_KEY, EMPTY_TEXT, NO_TOKENS,
           TOKENIZER_ERROR, READ_ERROR)

BLANK = "blank"  # marker for blank lines: skipped, counted, never an error


@dataclass(frozen=True)
class Issue:
    """Why the record at ``path:line`` was skipped."""

    path: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.detail}"

    def to_dict(self) -> dict:
        return {"file": self.path, "line": self.line, "reason": self.reason, "detail": self.detail}


class BadRecordError(ValueError):
    """Raised in --strict mode at the first unusable record; the message names file, line and reason."""

    def __init__(self, issue: Issue):
        super().__init__(f"bad input at {issue} (run without --strict to skip and report such records)")
        self.issue = issue


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ABSENT = object()


def _check_text(value, key: str) -> Optional[Tuple[str, str]]:
    """(reason, detail) if ``value`` cannot be tokenized as the text of ``key``, else None."""
    if value is _ABSENT:
        return MISSING_KEY, f"field {key!r} is missing"
    if value is None:
        return NON_STRING_KEY, f"field {key!r} is null, not a string"
    if not isinstance(value, str):
        return NON_STRING_KEY, f"field {key!r} is {type(value).__name__}, not a string: {_short(value)}"
    if not value.strip():
        return EMPTY_TEXT, f"field {key!r} is empty" if not value else f"field {key!r} is only whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return INVALID_UTF8, f"field {key!r} has a lone surrogate at character {err.start}"
    return None


def parse_record(raw: Union[bytes, dict], keys: Sequence[str]) -> Union[List[str], Tuple[str, str]]:
    """The texts for ``keys`` (in order), or ``(reason, detail)`` when the record must be skipped.

    ``raw`` is a JSONL line (bytes, newline stripped) or a Parquet row (dict). Returns ``(BLANK, "")`` for a
    blank JSONL line.
    """
    if isinstance(raw, (bytes, bytearray)):
        if not raw.strip():
            return BLANK, ""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return INVALID_UTF8, f"byte {err.start} ({raw[err.start:err.start + 1]!r}) is not valid UTF-8"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            return INVALID_JSON, f"{err.msg} at column {err.colno}"
        except RecursionError:
            return INVALID_JSON, "nesting too deep"
        if not isinstance(obj, dict):
            return NOT_AN_OBJECT, f"JSON {type(obj).__name__}, expected an object"
    else:
        obj = raw
    texts = []
    for key in keys:
        value = obj.get(key, _ABSENT)
        if isinstance(value, (bytes, bytearray)):  # Parquet binary column: text if it decodes
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as err:
                return INVALID_UTF8, f"field {key!r}: byte {err.start} is not valid UTF-8"
        problem = _check_text(value, key)
        if problem is not None:
            return problem
        texts.append(value)
    return texts
