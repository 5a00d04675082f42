"""Skip a test module clearly when the MRML classes of the slicer-core wheel are not installed."""

from __future__ import annotations

import pytest

__all__ = ["require_mrml"]


def require_mrml():
    """Return the ``slicer`` package with real MRML, or skip the calling module.

    ``pytest.importorskip("slicer")`` is not enough: any folder named ``slicer`` on ``sys.path``
    satisfies that import as a namespace package. The MRML scene class is what the tests need.
    """
    try:
        import slicer
    except ImportError:
        pytest.skip("slicer-core (real MRML) is not installed: pip install 'segviz[slicer]'", allow_module_level=True)
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip(
            f"'slicer' here ({list(getattr(slicer, '__path__', []))}) is not the slicer-core MRML wheel",
            allow_module_level=True,
        )
    return slicer
