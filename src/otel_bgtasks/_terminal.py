"""Text read from a store, made safe to print on a terminal.

Entries are untrusted: an error message can carry ESC/CSI/OSC sequences (clear the screen,
hide text, set the window title, write a hyperlink) or bidirectional overrides that make a
line read differently from what it is. Every such character is shown escaped (``\\x1b``).
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls but tab and newline, DEL, C1 controls; bidi embeddings, overrides and isolates;
# line/paragraph separators (a newline to a terminal but not to splitlines' reader).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, multiline: bool = False) -> str:
    """`text` with every control character escaped; newlines and tabs kept if `multiline`."""
    return (_UNSAFE if multiline else _UNSAFE_LINE).sub(_escape, text)
