"""Headless logic of the SegViz Slicer module: MRML <-> files, segments, subprocess jobs, panel state.

Everything here runs without Qt or the Slicer application: it needs only the MRML classes of
``slicer`` (the slicer-core wheel outside Slicer, the real application inside it), SimpleITK and
numpy, so the pytest suite can exercise it. ``SegVizSlicer.py`` is the thin GUI on top.
"""

from __future__ import annotations

__all__ = [
    "compatibility",
    "dependencies",
    "federation_controller",
    "inference_controller",
    "job",
    "logic",
    "model_summary",
    "panel_settings",
    "panel_state",
    "resources",
    "segment_import",
    "site_export",
    "terminology",
    "volume_nodes",
    "workflows",
]
