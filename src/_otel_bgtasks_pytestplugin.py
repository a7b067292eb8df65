"""The pytest plugin of otel-bgtasks (entry point ``pytest11``): the `bgtasks` fixture.

Registered when the package is installed, and inert until a test requests `bgtasks`: no hooks,
no autouse fixtures. It lives outside the `otel_bgtasks` package, and imports it only inside the
fixture, because pytest imports plugins before coverage starts: importing the package here
would hide its module-level code from the coverage of every project that installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from otel_bgtasks.testing import BgTasks

__all__ = ["bgtasks", "bgtasks_options"]


@pytest.fixture
def bgtasks_options() -> dict[str, Any]:
    """Options for the `bgtasks` fixture's `instrument()` call; override it to set a default
    retry policy, trace mode or timeout for a module or a whole test suite."""
    return {}


@pytest.fixture
def bgtasks(bgtasks_options: dict[str, Any]) -> Iterator[BgTasks]:
    """Background tasks instrumented with in-memory providers and dead-letter store for this
    test (`otel_bgtasks.testing.BgTasks`); uninstrumented afterwards."""
    from otel_bgtasks.testing import BgTasks

    with BgTasks(**bgtasks_options) as harness:
        yield harness
