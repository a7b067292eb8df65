"""Every error a user can cause is a `BgTasksError` whose message says what to do (issue 19).

Each case is a call a user might write wrongly; the error must be one of ours and keep the
built-in base it always had (``except ValueError`` code keeps working).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otel_bgtasks import BgTasksError, schedule
from otel_bgtasks.alerting import (
    ConsecutiveFailures,
    DeadLetterMoves,
    EmailNotifier,
    FailureRatio,
    SlowTask,
    WebhookNotifier,
)
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.stores import BufferedStore, SQLiteDeadLetterStore, open_store


def _missing_dir(tmp_path: Path) -> Any:
    return open_store(f"sqlite:///{tmp_path}/missing/dlq.db")


def _buffer(tmp_path: Path) -> Any:
    return BufferedStore(SQLiteDeadLetterStore(tmp_path / "dlq.db"), max_pending=0)


CASES: list[tuple[str, Callable[[Path], Any], type[Exception], str]] = [
    ("store in a missing directory", _missing_dir, ValueError, "does not exist; create it"),
    ("store URL of an unknown scheme", lambda _: open_store("mysql://x/db"), ValueError, "valid"),
    ("buffer of no entries", _buffer, ValueError, "max_pending must be >= 1"),
    ("empty bearer token", lambda _: bearer_token_auth(""), ValueError, "non-empty token"),
    ("admin router without auth", lambda _: bgtasks_router(), ValueError, "admin=False"),
    ("rule of 0 failures", lambda _: ConsecutiveFailures(0), ValueError, "must be >= 1"),
    ("ratio above 1", lambda _: FailureRatio(2.0), ValueError, "must be in (0, 1]"),
    ("negative move count", lambda _: DeadLetterMoves(more_than=-1), ValueError, ">= 0"),
    ("slow task at 0 s", lambda _: SlowTask(0), ValueError, "must be > 0"),
    ("webhook timeout 0", lambda _: WebhookNotifier("http://h/", timeout=0), ValueError, "> 0"),
    (
        "e-mail without recipients",
        lambda _: EmailNotifier("h", sender="a@b", recipients=[]),
        ValueError,
        "recip",
    ),
    ("schedule before instrument", lambda _: schedule(print), RuntimeError, "instrument()"),
]


@pytest.mark.parametrize(
    ("call", "base", "hint"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_user_caused_error_is_ours_and_keeps_its_builtin_base(
    tmp_path: Path, call: Callable[[Path], Any], base: type[Exception], hint: str
) -> None:
    with pytest.raises(BgTasksError) as raised:
        call(tmp_path)
    assert isinstance(raised.value, base)
    assert hint in str(raised.value)
