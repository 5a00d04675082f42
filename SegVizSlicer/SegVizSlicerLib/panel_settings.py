"""Settings that outlive a scene (SuperLink address, site folder, certificates, keys, last model).

The panel keeps them in ``qt.QSettings`` (Slicer's own settings file); anything with QSettings'
``value(key, default)`` / ``setValue(key, value)`` works, so the reading and writing is tested
without Qt. Scene-bound choices (input volume, output segmentation) stay in the parameter node.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["SETTINGS_GROUP", "PanelSettings", "default_work_folder"]

SETTINGS_GROUP = "SegViz"


def default_work_folder() -> Path:
    """``~/SegViz``: the site folders live there, kept across sessions (they hold the site's
    cases and its BatchNorm state between rounds)."""
    return Path.home() / "SegViz"


@dataclass
class PanelSettings:
    """Everything the panel remembers between Slicer sessions."""

    superlink: str = ""
    site_name: str = ""
    site_folder: str = ""
    root_certificate: str = ""
    trust_file: str = ""
    node_key: str = ""
    insecure: bool = False
    share_final_batchnorm: bool = False
    last_model: str = ""
    device: str = "auto"

    @classmethod
    def load(cls, store) -> PanelSettings:
        """Read from ``store`` (a ``qt.QSettings``); missing or unreadable keys keep their default.

        QSettings gives back strings for values written by another Slicer (``"true"``), so each
        value is converted to the field's type here.
        """
        settings = cls()
        for item in fields(cls):
            raw = store.value(f"{SETTINGS_GROUP}/{item.name}", None)
            if raw is None:
                continue
            default = getattr(settings, item.name)
            if isinstance(default, bool):
                value = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("true", "1", "yes")
            else:
                value = str(raw)
            setattr(settings, item.name, value)
        if settings.device not in ("auto", "cpu", "cuda"):
            settings.device = "auto"
        return settings

    def save(self, store) -> None:
        """Write every setting to ``store``."""
        for item in fields(self):
            store.setValue(f"{SETTINGS_GROUP}/{item.name}", getattr(self, item.name))

    def site_dir(self) -> Path | None:
        """The site folder, or None when none is set."""
        return Path(self.site_folder).expanduser() if self.site_folder.strip() else None
