"""Text from the store never reaches the terminal raw: control sequences are shown escaped."""

from __future__ import annotations

import json

import pytest

from otel_bgtasks._terminal import printable
from otel_bgtasks.cli import main
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.security.test_planted_entries import planted_letter

CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home
TITLE = "\x1b]0;owned\x07"  # OSC: set the window title
HIDDEN = "\x1b[8m"  # conceal what follows
LINK = "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"  # OSC 8 hyperlink
BIDI = "\u202eexe.txt"  # right-to-left override
C1 = "\x9b2J"  # a C1 CSI
SEQUENCES = CLEAR + TITLE + HIDDEN + LINK + BIDI + C1


def test_printable_escapes_every_control_character() -> None:
    assert printable(SEQUENCES) == (
        "\\x1b[2J\\x1b[H\\x1b]0;owned\\x07\\x1b[8m\\x1b]8;;http://evil.example\\x1b\\click"
        "\\x1b]8;;\\x1b\\\\u202eexe.txt\\x9b2J"
    )
    assert printable("a\tb\nc") == "a\\x09b\\x0ac"
    assert printable("a\tb\nc\r", multiline=True) == "a\tb\nc\\x0d"
    assert printable("naïve café ✓") == "naïve café ✓"  # printable text is left alone


@pytest.fixture
def hostile(store: SQLiteDeadLetterStore) -> str:
    entry = planted_letter(f"tests.security.app_tasks:record{TITLE}", 1, task_name=f"t{CLEAR}")
    entry = entry.replace(
        error_type=f"Error{HIDDEN}",
        error_message=f"boom {SEQUENCES}",
        traceback=f"Traceback (most recent call last):\n  {LINK}\nError: {SEQUENCES}\n",
        payload=json.dumps({"args": [SEQUENCES], "kwargs": {}}, ensure_ascii=False),
    )
    store.put(entry)
    return entry.id


def raw_control(text: str) -> set[str]:
    return {ch for ch in text if (ord(ch) < 0x20 and ch not in "\n") or 0x7F <= ord(ch) <= 0x9F
            or ch == "\u202e"}  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "list"],
        ["dlq", "list", "--tasks", "tests.security.app_tasks"],
        ["dlq", "show", "ID"],
        ["dlq", "show", "ID", "--json"],
        ["dlq", "list", "--json"],
        ["dlq", "replay", "--all"],
        ["dlq", "replay", "--all", "--tasks", "tests.security.app_tasks"],
    ],
)
def test_no_field_reaches_the_terminal_raw(
    capsys: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    hostile: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    argv = [hostile if a == "ID" else a for a in argv]
    main(["--store", f"sqlite:///{store.path}", *argv])
    out, err = capsys.readouterr()
    assert raw_control(out) == set()
    assert raw_control(err) == set()
    assert "\\x1b" in out + err or "\\u001b" in out  # shown, escaped (JSON escapes on its own)
