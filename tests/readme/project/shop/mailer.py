"""The shop's mail client (a stand-in: nothing is sent)."""

from __future__ import annotations

SENT: list[tuple[str, str]] = []


def send(address: str, subject: str) -> None:
    SENT.append((address, subject))
