"""Errors that the CLI turns into one-line messages (quantize/exits.py maps each to its exit code)."""

from __future__ import annotations


class RqInputError(Exception):
    """Bad user input: a path, a folder, a labels file, a model. The message is shown as is, on one line."""


class DatasetError(RqInputError):
    """An image folder or labels file that rq cannot use."""


class RqEnvironmentError(Exception):
    """The machine failed, not the input: a full disk, a permission lost mid-run. The message names the path."""

    def __init__(self, message: str, path: object = None):
        super().__init__(message)
        self.path = path
