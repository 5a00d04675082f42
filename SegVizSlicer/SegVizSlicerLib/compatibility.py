"""What differs between the Slicer releases and platforms SegViz runs on, one small function each.

Supported: the 3D Slicer release line whose Python runs Flower 1.42 (``flwr`` needs Python >= 3.11):
Slicer 5.10 and later, which ship Python 3.12 (``Slicer_REQUIRED_PYTHON_VERSION`` is 3.12.10 in the
v5.10.0 and v5.12 sources; Slicer 5.6 and 5.8 ship Python 3.9.10). Every other function here picks
the API a given release or operating system has; each branch has its own test.

This module is imported by ``SegVizSlicer.py`` before anything else of SegViz, so it must stay
importable by the Python 3.9 of an old Slicer (that is how the panel can say "too old" instead of
crashing): no syntax newer than 3.9 outside annotations.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CREATE_NEW_PROCESS_GROUP",
    "CREATE_NO_WINDOW",
    "MINIMUM_PYTHON",
    "MINIMUM_SLICER",
    "SUPPORTED_RELEASES",
    "child_process_options",
    "graceful_stop_signal",
    "install_python_packages",
    "segment_terminology",
    "set_segment_terminology",
    "unsupported_reason",
]

MINIMUM_SLICER = (5, 10)
"""The oldest Slicer release SegViz supports."""
MINIMUM_PYTHON = (3, 11)
"""Flower 1.42 (``flwr``) requires Python >= 3.11."""
SUPPORTED_RELEASES = "3D Slicer 5.10 or later (Python 3.12)"
"""How the panel, the user guide and the extension metadata name the supported releases."""

# Win32 process creation flags (winbase.h). subprocess defines them only on Windows; the values are
# fixed by the Windows API, so the argv/flags a Windows Slicer gets can be built and tested anywhere.
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
_CTRL_BREAK_EVENT = getattr(signal, "CTRL_BREAK_EVENT", 1)


def unsupported_reason(slicer_version: tuple[int, int] | None, python_version: Sequence[int]) -> str | None:
    """Why SegViz cannot run in this Slicer, or None when it can.

    Args:
        slicer_version: ``(major, minor)`` of the running Slicer (``slicer.app.majorVersion``,
            ``minorVersion``), or None outside the Slicer application.
        python_version: ``sys.version_info`` of the running Python.

    Returns:
        One sentence for the panel naming the running and the needed versions, or None.
    """
    python = tuple(python_version[:2])
    running_python = ".".join(str(v) for v in python)
    if slicer_version is not None and tuple(slicer_version) < MINIMUM_SLICER:
        return (
            f"SegViz needs {SUPPORTED_RELEASES}; this is Slicer {slicer_version[0]}.{slicer_version[1]} "
            f"with Python {running_python}, which cannot run Flower (Python >= 3.11). "
            "Install the current Slicer release from download.slicer.org."
        )
    if python < MINIMUM_PYTHON:
        return (
            f"SegViz needs Python >= {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} (Flower 1.42); this Python is "
            f"{running_python}. Use {SUPPORTED_RELEASES}."
        )
    return None


def set_segment_terminology(segment, entry: str) -> None:
    """Give a ``vtkSegment`` its serialised terminology entry.

    Slicer >= 5.10 has ``vtkSegment.SetTerminology``; older releases store the same string in the
    tag named by ``vtkSegment.GetTerminologyEntryTagName()`` (what SlicerTotalSegmentator does).
    """
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        _set_terminology_tag(segment, entry)


def _set_terminology_tag(segment, entry: str) -> None:
    segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def segment_terminology(segment) -> str:
    """A ``vtkSegment``'s serialised terminology entry, ``""`` when it has none.

    ``GetTerminology()`` where it exists (Slicer >= 5.10); otherwise the two-argument
    ``GetTag(name, value)``, whose output argument VTK's Python wrapping takes as a
    ``vtk.reference`` (the one-argument ``GetTag("TerminologyEntry")`` raises TypeError).
    """
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    return _terminology_tag(segment)


def _terminology_tag(segment) -> str:
    import vtk

    value = vtk.reference("")
    if not segment.GetTag(segment.GetTerminologyEntryTagName(), value):
        return ""
    return str(value)


def child_process_options(os_name: str | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a SegViz child the panel can stop as a group.

    POSIX: a new session, so a terminal's Ctrl-C or Slicer's own signals do not reach it and the
    child leads its own process group. Windows: a new process group (so ``CTRL_BREAK_EVENT`` can
    be sent to it alone) and no console window popping up over Slicer.
    """
    if (os_name or os.name) == "nt":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def graceful_stop_signal(os_name: str | None = None) -> int:
    """The signal that asks ``segviz`` to end cleanly (it tells the coordinator and stops its
    SuperNode): SIGTERM on POSIX (``segviz`` turns it into KeyboardInterrupt); on Windows, where
    SIGTERM is TerminateProcess and nothing could clean up, ``CTRL_BREAK_EVENT`` to the child's
    process group."""
    if (os_name or os.name) == "nt":
        return _CTRL_BREAK_EVENT
    return int(signal.SIGTERM)


def install_python_packages(requirements: Sequence[str], slicer_module, requester: str) -> None:
    """Install ``requirements`` (pip requirement strings) into Slicer's Python; the person has
    already agreed (the panel asks once, listing every package with its version).

    Slicer >= 5.12 has ``slicer.packaging.pip_ensure``, which shows a progress dialog and offers a
    restart when an already imported package changed; Slicer 5.10 has only ``slicer.util.pip_install``.

    Args:
        requirements: e.g. ``["monai>=1.4,<2", "flwr>=1.42,<1.43"]``.
        slicer_module: the ``slicer`` module (passed in so this stays importable without Slicer).
        requester: the name the dialogs show ("SegViz").

    Raises:
        subprocess.CalledProcessError: pip failed.
    """
    requirements = list(requirements)
    if not requirements:
        return
    packaging = getattr(slicer_module, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(requirements, requester=requester, prompt_install=False)
    else:
        slicer_module.util.pip_install(requirements)
