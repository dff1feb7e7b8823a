"""Exceptions that carry a message meant for the user (the CLI prints them on one line, exit code 2)."""

from __future__ import annotations


class CropInputError(ValueError):
    """Bad input from the user: a missing or corrupt image, an empty question, a box off the grid, ..."""
