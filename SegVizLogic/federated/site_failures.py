"""What a site tells its coordinator when a round fails: a fixed category and a count, never a
file name.

Error messages at a site name files, and hospital file and folder names are patient identifiers
(``MRN12345 DOE JANE.nrrd``, ``D:\\PACS\\DOE^JANE\\ct.nii.gz``, ``\\\\pacs\\export\\...``). Scrubbing
paths out of free text misses some of them (spaces, ``^``, Windows and UNC paths, names inside
quotes), so the text never leaves the site: :func:`failure_category` maps the exception to one
of a few fixed sentences, built only from its type and counts; the full message stays in the
site's own log (``<site>/.segviz/federated/``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SegVizInputError
from ..site import IMAGES_DIR, LABELS_DIR, SITE_FILE, SiteValidationError

__all__ = ["CATEGORIES", "SiteRoundError", "failure_category", "site_name_for_reports"]

CATEGORIES = {
    "unreadable": "{count} case{s} unreadable",
    "site": "site folder invalid ({count} problem{s})",
    "version": "SegViz {site_version} at this site, {coordinator_version} at the coordinator",
    "memory": "out of memory while training",
    "other": "training failed (see the site's log)",
}
"""Every sentence a site may send on failure (``{count}``-style fields are numbers or versions)."""


class SiteRoundError(Exception):
    """A round that failed in a site's worker process: the category (what may leave the site)
    and the full detail (what stays in the site's log)."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(category)
        self.category, self.detail = category, detail


def _plural(count: int) -> str:
    return "" if count == 1 else "s"


def _case_of(path_text: str) -> str | None:
    """The case a problem's path belongs to (``images/<case>...`` or ``labels/<case>...``), else ``None``.

    Computed at the site only to count cases; no part of it is ever sent.
    """
    parts = path_text.replace("\\", "/").split("/")
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] in (IMAGES_DIR, LABELS_DIR):
            return parts[index + 1].split(".")[0]
    return None


def _site_problems(error: SiteValidationError) -> str:
    cases = [_case_of(problem.split(": ", 1)[0]) for problem in error.problems]
    if cases and all(cases):
        count = len(set(cases))
        return CATEGORIES["unreadable"].format(count=count, s=_plural(count))
    count = max(len(error.problems), 1)
    return CATEGORIES["site"].format(count=count, s=_plural(count))


def failure_category(
    error: BaseException, site_version: str | None = None, coordinator_version: str | None = None
) -> str:
    """The one sentence about ``error`` that may leave the site.

    Args:
        error: what the round raised.
        site_version: this site's SegViz version, for a version mismatch.
        coordinator_version: the coordinator's SegViz version, for a version mismatch.

    Returns:
        One of :data:`CATEGORIES`, filled only with counts and version numbers.
    """
    if isinstance(error, SiteRoundError):
        return error.category
    if site_version and coordinator_version and site_version.split(".")[:2] != coordinator_version.split(".")[:2]:
        return CATEGORIES["version"].format(site_version=site_version, coordinator_version=coordinator_version)
    if isinstance(error, SiteValidationError):
        return _site_problems(error)
    if isinstance(error, SegVizInputError):
        if error.path is None or _case_of(error.path) is None:  # the node's configuration or site.json
            return CATEGORIES["site"].format(count=1, s="")
        return CATEGORIES["unreadable"].format(count=1, s="")
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return CATEGORIES["memory"]
    return CATEGORIES["other"]


def site_name_for_reports(site_dir: str | Path) -> str:
    """The site's declared name (``site.json``), which its replies carry anyway; ``"site"`` when
    it cannot be read (a broken site folder must not make the report fail)."""
    try:
        name = json.loads((Path(site_dir) / SITE_FILE).read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return "site"
    return name if isinstance(name, str) and name.strip() else "site"
