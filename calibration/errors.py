"""Errors that the CLI turns into one-line messages."""


class RqInputError(Exception):
    """Bad user input: a path, a folder, a labels file, a model. The message is shown as is, on one line."""


class DatasetError(RqInputError):
    """An image folder or labels file that rq cannot use."""
