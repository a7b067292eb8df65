"""The package version, in one place (read by the build backend too)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
