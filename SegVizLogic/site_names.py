"""What a site may be called.

A site's name travels: into ``site.json``, the model bundle's provenance, the zip member of its
BatchNorm variant (``batchnorm/site__<name>.npz``), file names under ``.segviz/`` and every log
line. So a name is one printable line that cannot name another path: no ``/`` or ``\\``, no
``..``, no control or invisible characters, at most :data:`MAX_SITE_NAME_LENGTH` characters.
This module imports nothing heavy, so the torch-free bundle manifest reader uses it too.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_SITE_NAME_LENGTH", "site_name_problem"]

MAX_SITE_NAME_LENGTH = 64
"""Longest site name accepted (it becomes part of file names and table columns)."""


def site_name_problem(name: object) -> str | None:
    """Say why ``name`` cannot be a site's name, or return ``None`` for a good one.

    Args:
        name: the candidate, as read from JSON (any type).

    Returns:
        one-line reason (quoting the name with ``repr`` so a newline shows as ``\\n``), or None.

    Example::

        site_name_problem("hospital-a")    # None
        site_name_problem("../etc")        # "site name '../etc' contains '/' ..."
    """
    if not isinstance(name, str) or not name.strip():
        return f"site name must be a non-empty string, got {name!r}"
    if name != name.strip():
        return f"site name {name!r} starts or ends with white space"
    if len(name) > MAX_SITE_NAME_LENGTH:
        return f"site name is {len(name)} characters long (at most {MAX_SITE_NAME_LENGTH})"
    # Category C: control (newline, tab, escape), format (zero-width, bidi overrides), unassigned, private.
    hidden = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c).startswith("C")})
    if hidden:
        return f"site name {name!r} contains control or invisible characters ({', '.join(hidden)})"
    for separator in ("/", "\\"):
        if separator in name:
            return f"site name {name!r} contains {separator!r}; it becomes part of file names"
    if ".." in name:
        return f"site name {name!r} contains '..'; it becomes part of file names"
    return None
