"""Output locations, checked before any work: a command that will fail to write its result
says so before minutes of inference, not after.

Light on purpose (no SimpleITK, no torch): every command that writes calls it first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import SegVizInputError

__all__ = ["check_output_folder", "check_output_path", "check_parent_folder"]


def check_output_path(
    path: str | Path,
    force: bool = False,
    suffixes: Sequence[str] | None = None,
    inputs: Sequence[str | Path | None] = (),
) -> Path:
    """Check, before any work, that ``path`` can be written as a new output file.

    Refused: an unsupported suffix (when ``suffixes`` is given), a folder at ``path``, a parent
    that is a file or not writable, ``path`` being one of ``inputs`` (never, even with
    ``force``: a CT overwritten by its labels is lost), and an existing file without ``force``.

    Args:
        path: the output file.
        force: an existing file may be replaced.
        suffixes: accepted file name endings (``".nii.gz"``), or None for any.
        inputs: files or folders the command reads (None entries are skipped).

    Returns:
        ``path`` as a Path.

    Raises:
        SegVizInputError: naming ``path`` and the problem.

    Example::

        check_output_path("seg.png", suffixes=(".nii.gz", ".nrrd"))  # unsupported file type ".png"
    """
    path = Path(path)
    if suffixes is not None and not any(path.name.lower().endswith(s) and path.name != s for s in suffixes):
        raise SegVizInputError(
            path,
            f"unsupported file type {path.suffix.lower() or '(none)'!r} for writing: expected {', '.join(suffixes)}",
        )
    if path.is_dir():
        raise SegVizInputError(path, "is a folder; expected a file name to write")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise SegVizInputError(path, f"is also an input ({source}); choose another output file")
    check_parent_folder(path)
    if path.exists() and not force:
        raise SegVizInputError(path, "already exists; use --force to overwrite")
    return path


def check_output_folder(path: str | Path) -> Path:
    """Check, before any work, that ``path`` is or can become a folder to write into.

    Raises:
        SegVizInputError: ``path`` is a file, or a parent is a file or not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SegVizInputError(path, "is a file; expected a folder to write into")
    if path.is_dir():
        if not os.access(path, os.W_OK):
            raise SegVizInputError(path, "is not writable (no permission)")
        return path
    check_parent_folder(path)
    return path


def check_parent_folder(path: str | Path) -> None:
    """Refuse ``path`` unless its nearest existing ancestor is a writable folder (the rest is created).

    Raises:
        SegVizInputError: a parent is a file, or not writable.
    """
    ancestor = Path(path).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SegVizInputError(path, f"cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK):
        raise SegVizInputError(path, f"cannot be created: no permission to write in {ancestor}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)
