"""A string that never shows itself: webhook URLs, SMTP passwords."""

from __future__ import annotations

from typing import Final

__all__ = ["MASK", "Secret", "reveal"]

MASK: Final = "**********"


class Secret:
    """Holds a secret value; `repr`, `str` and f-strings show only `**********`.

    The value is read with `get_secret_value()`, only where it is used (an HTTP request, an
    SMTP login), so configuration objects, notifiers and log lines can be printed safely.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret() takes a str, got {type(value).__name__}")
        self._value = value

    def get_secret_value(self) -> str:
        """The secret itself: pass it to the library that needs it, never to a log."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, format_spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        # Copying a config object must keep the value; pickling it is the caller's choice.
        return (Secret, (self._value,))


def reveal(value: str | Secret | None) -> str | None:
    """The plain value of `value`, whether it is a `Secret` or already a string."""
    if isinstance(value, Secret):
        return value.get_secret_value()
    return value
