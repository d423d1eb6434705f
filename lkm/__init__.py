"""lkm, the Local Key Manager."""

__version__ = "0.1.0"
