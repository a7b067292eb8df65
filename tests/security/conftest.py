"""Fixtures of the adversarial suite: a planted module whose import leaves a mark, a store."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.security import app_tasks


@dataclass(frozen=True)
class Planted:
    """A module on sys.path that writes `imported_mark` when imported, and a shell command
    that writes `ran_mark` when run: an attacker's entries name them."""

    module: str
    imported_mark: Path
    ran_mark: Path

    @property
    def command(self) -> str:
        return f"touch {self.ran_mark}"

    def untouched(self) -> bool:
        return (
            not self.imported_mark.exists()
            and not self.ran_mark.exists()
            and self.module not in sys.modules
        )


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Planted]:
    name = f"planted_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "attacker"
    code_dir.mkdir()
    mark = tmp_path / "imported"
    (code_dir / f"{name}.py").write_text(
        f"open({str(mark)!r}, 'w').write('imported')\n"
        "def run(*args, **kwargs):\n"
        f"    open({str(mark)!r}, 'a').write('ran')\n"
    )
    monkeypatch.syspath_prepend(str(code_dir))
    yield Planted(name, mark, tmp_path / "pwned")
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _reset_ran() -> Iterator[None]:
    app_tasks.RAN.clear()
    yield
    app_tasks.RAN.clear()
