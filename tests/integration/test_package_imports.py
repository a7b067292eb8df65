"""What importing the package loads, seen from a fresh interpreter (a subprocess, hence not in
tests/unit)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_loads_no_optional_feature():
    code = (
        "import sys, otel_bgtasks;"
        "print(sorted(m for m in ('redis', 'httpx', 'smtplib', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
