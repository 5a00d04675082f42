"""Errors that SegViz reports to a person as one clear line."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BundleError", "SegVizError", "SegVizInputError"]


class SegVizError(Exception):
    """Base class of errors the CLI prints as ``error: <message>`` and exits non-zero."""


class SegVizInputError(SegVizError, ValueError):
    """Bad input: a file or folder that cannot be used, with the path and the problem.

    Example::

        raise SegVizInputError("site1/images/a.nii.gz", "file is truncated")
        # str(e) == "site1/images/a.nii.gz: file is truncated"
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class BundleError(SegVizInputError):
    """A model bundle that is damaged, truncated or incompatible."""
