"""The pack's version, written into every concept bundle and exported file."""

__version__ = "0.1.0"
