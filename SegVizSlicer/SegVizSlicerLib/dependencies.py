"""Which Python packages a SegViz feature needs, which Slicer's Python lacks, and how to install them.

Nothing is installed here. The panel shows :func:`status_line`; when Apply or Join round first
needs a package it asks the person, then installs PyTorch through the PyTorch extension
(``PyTorchUtils``, which picks the CUDA build for the machine's driver, as SlicerTotalSegmentator
does) and the rest with Slicer's pip (:func:`.compatibility.ensure_python_packages`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

__all__ = [
    "FEATURE_PACKAGES",
    "MissingPackage",
    "install_plan",
    "missing_packages",
    "read_requirements",
    "status_line",
]

# Distributions (as in Resources/requirements.txt) each feature imports.
FEATURE_PACKAGES = {
    "infer": ("torch", "monai", "nibabel", "scipy", "rich", "psutil"),
    "federation": ("torch", "monai", "nibabel", "scipy", "rich", "psutil", "flwr", "cryptography"),
}


@dataclass(frozen=True)
class MissingPackage:
    """A required package that is absent or of a version outside the requirement."""

    requirement: Requirement
    installed: str | None

    @property
    def name(self) -> str:
        return self.requirement.name

    def describe(self) -> str:
        """``"flwr (needs >=1.42,<1.43; 1.20.0 installed)"`` or ``"monai (needs >=1.4,<2; missing)"``."""
        wanted = str(self.requirement.specifier) or "any version"
        have = f"{self.installed} installed" if self.installed else "missing"
        return f"{self.name} (needs {wanted}; {have})"


def read_requirements(path: str | Path) -> dict[str, Requirement]:
    """The requirements file as ``{canonical name: Requirement}``.

    Raises:
        ValueError: a line is not a valid requirement (names the file and line).
    """
    requirements = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        requirements[canonicalize_name(requirement.name)] = requirement
    return requirements


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(feature: str, requirements_file: str | Path) -> list[MissingPackage]:
    """The packages ``feature`` ("infer" or "federation") needs that are missing or of a wrong version.

    Raises:
        ValueError: an unknown feature, or a package the requirements file does not list.
    """
    if feature not in FEATURE_PACKAGES:
        raise ValueError(f"feature must be one of {sorted(FEATURE_PACKAGES)}, got {feature!r}")
    requirements = read_requirements(requirements_file)
    missing = []
    for name in FEATURE_PACKAGES[feature]:
        requirement = requirements.get(canonicalize_name(name))
        if requirement is None:
            raise ValueError(f"{requirements_file} does not list {name}")
        installed = _installed_version(requirement.name)
        # A local build tag (torch 2.5.1+cu121) satisfies ">=2.2": compare the public version.
        public = installed.split("+", 1)[0] if installed else None
        if public is None or not requirement.specifier.contains(public, prereleases=True):
            missing.append(MissingPackage(requirement, installed))
    return missing


def status_line(missing: list[MissingPackage]) -> str:
    """The dependency line of the panel."""
    if not missing:
        return "All Python packages SegViz needs are installed."
    return "Python packages to install (asked first, when Apply or Join round needs them): " + "; ".join(
        package.describe() for package in missing
    )


def install_plan(missing: list[MissingPackage]) -> tuple[str | None, list[str]]:
    """``(torch version requirement for PyTorchUtils or None, pip requirement strings for the rest)``."""
    torch = next((p for p in missing if canonicalize_name(p.name) == "torch"), None)
    rest = [str(p.requirement) for p in missing if p is not torch]
    return (str(torch.requirement.specifier) if torch is not None else None), rest
