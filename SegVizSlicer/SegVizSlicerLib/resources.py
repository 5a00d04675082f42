"""Where the module's resources are: beside the module once installed, one folder up in a checkout.

CMake copies ``Resources/`` (and ``SegVizLogic/``) next to ``SegVizSlicer.py`` in the installed
extension; in a source checkout the module folder is ``<repo>/SegVizSlicer`` and they sit at the
repository root.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODULE_DIR", "resource_file"]

MODULE_DIR = Path(__file__).resolve().parent.parent
"""The folder holding ``SegVizSlicer.py``."""


def resource_file(relative: str) -> Path:
    """Path of ``Resources/<relative>``: the installed layout first, then the source checkout.

    Raises:
        FileNotFoundError: neither layout has it (a broken installation).
    """
    for root in (MODULE_DIR, MODULE_DIR.parent):
        candidate = root / "Resources" / relative
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"SegViz resource Resources/{relative} is missing beside {MODULE_DIR}: reinstall SegViz")
