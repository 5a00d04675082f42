"""Import MONAI without the heavy optional packages it would load for features SegViz never uses.

``import monai`` (and any ``import monai.<module>``, which runs the package's ``__init__`` first)
imports every MONAI submodule, and through their optional imports whatever of transformers,
torchvision, matplotlib, scipy.signal, pandas and OpenCV is installed: 9.9 s of a GPU machine's
12 s startup went to transformers alone (docs/BENCHMARKS.md). Skipping MONAI's own submodules is
not possible without replacing its package ``__init__`` (fragile across MONAI releases), so this
module imports MONAI once with those optional packages marked absent (a ``None`` entry in
``sys.modules`` makes an import raise ``ImportError``, which MONAI's ``optional_import`` records as
"not installed"), then removes the marks so that SegViz's own later imports of them work as usual.
MONAI then reports them missing only for its features that need them (TransCHeX, video datasets,
plotting), none of which SegViz calls.

Importing this module is what does it: the SegViz modules that use MONAI import it first.
"""

from __future__ import annotations

import sys

__all__ = ["SKIPPED_OPTIONAL_PACKAGES"]

SKIPPED_OPTIONAL_PACKAGES = ("transformers", "torchvision", "matplotlib", "scipy.signal", "pandas", "cv2", "pyarrow")
"""Packages MONAI imports optionally at its own import time and SegViz never needs through MONAI."""


def _import_monai() -> None:
    if "monai" in sys.modules:
        return
    marked = [name for name in SKIPPED_OPTIONAL_PACKAGES if name not in sys.modules]
    for name in marked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import monai  # noqa: F401
    finally:
        for name in marked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


_import_monai()
