"""The example app and the terminal demo (`python -m otel_bgtasks.demo`)."""

__all__: list[str] = []
