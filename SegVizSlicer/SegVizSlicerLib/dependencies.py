"""Which Python packages a SegViz feature needs, and which of them Slicer's Python lacks.

Nothing is installed here: the widget asks the person, then calls ``slicer.packaging.pip_ensure``
(Slicer >= 5.10) or ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

__all__ = ["FEATURE_MODULES", "missing_modules", "requirements_for"]

# import name -> requirement name in Resources/requirements.txt
FEATURE_MODULES = {
    "infer": {
        "torch": "torch",
        "monai": "monai",
        "SimpleITK": "SimpleITK",
        "nibabel": "nibabel",
        "scipy": "scipy",
        "rich": "rich",
    },
    "federation": {
        "torch": "torch",
        "monai": "monai",
        "flwr": "flwr",
        "SimpleITK": "SimpleITK",
        "nibabel": "nibabel",
        "scipy": "scipy",
        "cryptography": "cryptography",
        "rich": "rich",
    },
}


def missing_modules(feature: str) -> list[str]:
    """Import names a feature ("infer" or "federation") needs that cannot be found."""
    if feature not in FEATURE_MODULES:
        raise ValueError(f"feature must be one of {sorted(FEATURE_MODULES)}, got {feature!r}")
    return [name for name in FEATURE_MODULES[feature] if importlib.util.find_spec(name) is None]


def requirements_for(modules: list[str], requirements_file: str | Path, feature: str = "federation") -> list[str]:
    """The lines of ``requirements.txt`` that provide ``modules`` (pins kept)."""
    wanted = {FEATURE_MODULES[feature].get(m, m).lower() for m in modules}
    lines = []
    for line in Path(requirements_file).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        name = re.split(r"[<>=!~\[; ]", text, maxsplit=1)[0].lower()
        if name in wanted:
            lines.append(text)
    return lines
