"""The README's code blocks, found by their content, for the tests that run them as pasted.

A block is the text between a fence line (```` ```python ````, ```` ```sh ````) and the next
fence. Tests pick a block by a line it must contain, so an edited README keeps its examples
under test or fails loudly here (never silently skips one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["README", "Block", "block", "blocks", "substitute"]

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # 1-based line of the opening fence

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def blocks(path: Path = README) -> list[Block]:
    """Every fenced block of `path`, in order."""
    found: list[Block] = []
    language: str | None = None
    start = 0
    lines: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _FENCE.match(line)
        if language is None:
            if match:
                language, start, lines = match[1], number, []
        elif line.strip() == "```":
            found.append(Block(language, "\n".join(lines) + "\n", start))
            language = None
        else:
            lines.append(line)
    return found


def block(containing: str, language: str | None = None, path: Path = README) -> Block:
    """The one block holding the line fragment `containing`."""
    matches = [
        b
        for b in blocks(path)
        if containing in b.text and (language is None or b.language == language)
    ]
    assert len(matches) == 1, f"{path.name}: {len(matches)} blocks contain {containing!r}"
    return matches[0]


def substitute(text: str, replacements: dict[str, str]) -> str:
    """`text` with each key replaced; every key must occur (the README changed otherwise)."""
    for old, new in replacements.items():
        assert old in text, f"README block no longer contains {old!r}: update the test"
        text = text.replace(old, new)
    return text
