"""The package's version, on its own so that any module can record it without importing the `trce` facade."""

__version__ = "0.1.0"
