"""JSON read from a store, bounded in size and nesting before it is parsed.

A row is untrusted: 200,000 nested ``[`` make `json.loads` recurse until `RecursionError`,
and a row of gigabytes makes it allocate without bound. `loads_bounded` checks the length
and the nesting depth with a linear pre-scan (regular expressions, no recursion, no parse),
then parses; whatever goes wrong is one `ValueError` naming what.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["MAX_DOCUMENT_BYTES", "check_bounds", "dumps_streamed", "loads_bounded"]

MAX_DOCUMENT_BYTES = 256 * 1024 * 1024
"""Bytes of one stored document (a row, a payload) parsed at most; a bigger one is refused
unread (stores check the length before fetching it)."""

# A JSON string, escapes included; the closing quote is optional so that an unterminated
# string is consumed once to the end instead of being retried from each quote (quadratic).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_PAIR = re.compile(r"\[\]|\{\}")


def check_bounds(text: str | bytes, *, max_depth: int, max_bytes: int) -> str:
    """`text` as a string, once it is known to be at most `max_bytes` long and to nest at
    most `max_depth` arrays/objects deep (without parsing it).

    Raises:
        ValueError: too long, not UTF-8, too deep or unbalanced brackets.
    """
    if len(text) > max_bytes:
        raise ValueError(f"{len(text)} bytes, over the limit of {max_bytes}")
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if text.count("[") + text.count("{") <= max_depth:
        return text  # cannot nest deeper than its brackets (the common, small case)
    # Strings removed, then everything but brackets: what is left is the structure. Each pass
    # removes the innermost level, so after `max_depth` passes a valid text is empty.
    skeleton = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if len(skeleton) - len(skeleton.lstrip("[{")) > max_depth:  # e.g. 200,000 "[" in a row
        raise ValueError(f"nested deeper than {max_depth}")
    for _ in range(max_depth):
        if not skeleton:
            return text
        reduced = _PAIR.sub("", skeleton)
        if len(reduced) == len(skeleton):
            raise ValueError(f"unbalanced brackets or nested deeper than {max_depth}")
        skeleton = reduced
    if skeleton:
        raise ValueError(f"nested deeper than {max_depth}")
    return text


def loads_bounded(text: str | bytes, *, max_depth: int, max_bytes: int) -> Any:
    """`json.loads(text)` once `check_bounds` accepted it.

    Raises:
        ValueError: anything that makes the text unreadable (too long, too deep, not UTF-8,
            not JSON; a `RecursionError` or `MemoryError` of the parser too), said in one line.
    """
    checked = check_bounds(text, max_depth=max_depth, max_bytes=max_bytes)
    try:
        return json.loads(checked)
    except (RecursionError, MemoryError) as exc:  # the bounds make these unlikely, not impossible
        raise ValueError(f"cannot be parsed ({type(exc).__name__})") from None
    except ValueError as exc:  # JSONDecodeError: its message has a position, no content
        raise ValueError(f"not JSON ({exc})") from None


def dumps_streamed(
    fields: Mapping[str, Any], name: str, chunks: Iterable[bytes], *, indent: int | None = None
) -> Iterator[str]:
    """`fields` as a JSON object plus one more string member `name` whose value is the UTF-8
    text of `chunks`, yielded piece by piece: a value of any size is never whole in memory.

    Invalid UTF-8 shows as U+FFFD (a character cut between two chunks is kept whole).
    """
    head = json.dumps(dict(fields), indent=indent)
    opening = "\n" + " " * indent if indent is not None else ""
    closing = "\n}" if indent is not None else "}"
    separator = ("," if indent is not None else ", ") if fields else ""
    yield head[: -len(closing) if fields else -1] + f'{separator}{opening}"{name}": "'
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in chunks:
        yield json.dumps(decoder.decode(chunk))[1:-1]
    yield json.dumps(decoder.decode(b"", final=True))[1:-1] + '"' + closing
