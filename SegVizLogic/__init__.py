"""SegViz: federated multi-organ CT segmentation from partially-annotated sites.

Pure-Python core of the SegViz 3D Slicer extension. Nothing here imports slicer, qt or vtk.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
