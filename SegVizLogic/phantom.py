"""Deterministic synthetic abdominal CT sites: the data SegViz ships with and tests against.

The phantom is a patient drawn at random (body habitus, organ sizes, positions, small rotations,
bowel content), built from implicit surfaces in patient coordinates and then imaged by a
:class:`ScannerProfile` (contrast phase, noise, calibration offset, voxel spacing, field of view,
on-disk orientation and file format). The "paper" layout mimics the SegViz setting: four hospitals
that each annotated one organ, scanned on different machines with different protocols, plus a
fully-labelled external test set from a fifth scanner.

Geometry: anatomy lives in LPS patient coordinates in mm (x to the patient's left, y posterior,
z superior; the body's axial centre near x = y = 0, the scan range z ~ 0..200 mm). Every volume is
built on an identity-direction (LPS) grid and then permuted/flipped with ``sitk.DICOMOrient`` to
the scanner's on-disk orientation, which changes the voxel order but never the physical anatomy.

Example::

    layout = generate_phantom_sites("data/phantom", seed=0)
    layout.sites      # [.../site-liver, .../site-spleen, .../site-pancreas, .../site-kidney]
    layout.external   # .../external (all four organs labelled)
    ct, labels = make_phantom_case(7, phantom_scanners()["site-liver"])
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import SegVizInputError
from .organs import ORGANS, organ_by_name
from .progress import ProgressReporter

__all__ = [
    "FILE_FORMATS",
    "LAYOUTS",
    "PAPER_SITES",
    "PHASES",
    "SIZES",
    "TISSUES",
    "PatientPopulation",
    "PhantomAnatomy",
    "PhantomLayout",
    "ScannerProfile",
    "generate_phantom_sites",
    "make_phantom_case",
    "phantom_populations",
    "phantom_scanners",
    "render_phantom_montage",
    "sample_anatomy",
]

PHASES = ("portal-venous", "non-contrast", "arterial")
FILE_FORMATS = (".nii.gz", ".nrrd", ".mha")
SIZES = ("small", "full")
LAYOUTS = ("paper",)
# (site folder name, the one organ it annotated) for the "paper" layout.
PAPER_SITES: tuple[tuple[str, str], ...] = (
    ("site-liver", "liver"),
    ("site-spleen", "spleen"),
    ("site-pancreas", "pancreas"),
    ("site-kidney", "kidney"),
)
EXTERNAL_NAME = "external"

# Tissue classes of the phantom (the ground truth behind the HU values; returned on request).
TISSUES: dict[str, int] = {
    name: code
    for code, name in enumerate(
        (
            "air",
            "skin",
            "fat",
            "muscle",
            "visceral_fat",
            "bone_cortical",
            "bone_cancellous",
            "disc",
            "csf",
            "liver",
            "spleen",
            "pancreas",
            "kidney_cortex",
            "kidney_medulla",
            "renal_sinus",
            "aorta",
            "ivc",
            "portal_vein",
            "hepatic_vein",
            "bowel_wall",
            "fluid",
            "gas",
            "stool",
            "bile",
            "lung",
            "table",
        )
    )
}
T = TISSUES

# HU per tissue: (non-contrast, portal-venous, arterial, texture amplitude). Contrast phases scale
# the enhancement (phase - non-contrast) by the scanner's bolus factor and the patient's.
_HU: dict[str, tuple[float, float, float, float]] = {
    "air": (-1000, -1000, -1000, 0),
    "skin": (35, 45, 40, 6),
    "fat": (-100, -100, -100, 7),
    "muscle": (42, 50, 46, 6),
    "visceral_fat": (-98, -98, -98, 8),
    "bone_cortical": (1050, 1050, 1050, 60),
    "bone_cancellous": (330, 335, 332, 45),
    "disc": (85, 95, 90, 6),
    "csf": (18, 22, 20, 4),
    "liver": (57, 118, 76, 6),
    "spleen": (50, 123, 112, 6),
    "pancreas": (42, 98, 115, 9),
    "kidney_cortex": (32, 184, 200, 6),
    "kidney_medulla": (30, 130, 72, 6),
    "renal_sinus": (-85, -80, -82, 10),
    "aorta": (42, 165, 320, 5),
    "ivc": (40, 140, 85, 5),
    "portal_vein": (40, 170, 125, 5),
    "hepatic_vein": (38, 155, 62, 5),
    "bowel_wall": (36, 92, 80, 6),
    "fluid": (12, 14, 13, 4),
    "gas": (-1000, -1000, -1000, 0),
    "stool": (5, 5, 5, 40),
    "bile": (8, 9, 8, 3),
    "lung": (-860, -855, -858, 30),
    "table": (180, 180, 180, 10),
}
_PHASE_COLUMN = {"non-contrast": 0, "portal-venous": 1, "arterial": 2}


# --------------------------------------------------------------------------------------------
# Scanner profiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and protocol image the phantom.

    Args:
        name: a short name (provenance only).
        phase: contrast phase, one of ``PHASES``.
        noise_sigma: standard deviation of the quantum noise in HU.
        intensity_offset: calibration offset added to every voxel, in HU.
        slice_thickness: slice spacing in mm (cranio-caudal).
        pixel_spacing: in-plane spacing in mm.
        fov: field of view in mm: (left-right, antero-posterior, cranio-caudal).
        orientation: on-disk orientation as three DICOM letters, the direction each array axis
            points to (``"LPS"`` is the identity direction; ``"RAS"``, ``"PIR"``...).
        file_format: ``".nii.gz"``, ``".nrrd"`` or ``".mha"``.
        contrast_scale: bolus factor multiplying the contrast enhancement (timing, dose).
        noise_grain: correlation length of the noise in voxels (reconstruction kernel: a soft
            kernel gives blotchy, a sharp one fine-grained noise).
        scan_center_z: cranio-caudal centre of the scan range in patient mm (protocols start
            and stop at different levels: liver dome to iliac crest, or lower).
        cupping: beam-hardening cupping in HU: the centre of the body reads this much lower
            than its edge.

    Example::

        ScannerProfile("ct-a", phase="arterial", pixel_spacing=2.5, orientation="RAS")
    """

    name: str = "scanner"
    phase: str = "portal-venous"
    noise_sigma: float = 12.0
    intensity_offset: float = 0.0
    slice_thickness: float = 4.0
    pixel_spacing: float = 3.0
    fov: tuple[float, float, float] = (340.0, 260.0, 200.0)
    orientation: str = "LPS"
    file_format: str = ".nii.gz"
    contrast_scale: float = 1.0
    noise_grain: float = 0.7
    scan_center_z: float = 105.0
    cupping: float = 0.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.file_format not in FILE_FORMATS:
            raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {self.file_format!r}")
        letters = str(self.orientation).upper()
        if len(letters) != 3 or sorted(
            {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(c, -1) for c in letters
        ) != [0, 1, 2]:
            raise ValueError(f"orientation must be three letters, one of each R/L, A/P, S/I; got {self.orientation!r}")
        object.__setattr__(self, "orientation", letters)
        for key in ("slice_thickness", "pixel_spacing", "contrast_scale"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.noise_sigma < 0 or self.noise_grain < 0:
            raise ValueError(
                f"noise_sigma and noise_grain must be >= 0, got {self.noise_sigma!r}, {self.noise_grain!r}"
            )
        if len(self.fov) != 3 or min(self.fov) <= 0:
            raise ValueError(f"fov must be three positive lengths in mm, got {self.fov!r}")
        if self.cupping < 0:
            raise ValueError(f"cupping must be >= 0 HU, got {self.cupping!r}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z) in mm on the LPS grid."""
        return (self.pixel_spacing, self.pixel_spacing, self.slice_thickness)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Voxel counts (x, y, z) on the LPS grid."""
        return tuple(max(8, round(f / s)) for f, s in zip(self.fov, self.spacing))  # type: ignore[return-value]


@dataclass(frozen=True)
class PatientPopulation:
    """Who a site scans: hospitals differ in their patients as much as in their scanners.

    Args:
        name: a short name (provenance only).
        habitus: mean body-frame size factor (skeleton and cavity).
        fat: mean subcutaneous fat factor (1 average, 1.3 an obese population).
        spread: scale of the inter-patient variation of organ sizes, shapes and positions
            (see :func:`sample_anatomy`).
        bolus_sd: spread of the contrast enhancement between patients (bolus timing, cardiac
            output), as a fraction of the enhancement.
        placement_sd: spread of the patient's placement in the scanner in mm (left-right,
            antero-posterior, and where the scan range starts along the body).

    Example::

        PatientPopulation("bariatric", fat=1.4, spread=1.2)
    """

    name: str = "average"
    habitus: float = 1.0
    fat: float = 1.0
    spread: float = 1.0
    bolus_sd: float = 0.03
    placement_sd: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        for key in ("habitus", "fat"):
            if not 0.5 <= getattr(self, key) <= 2.0:
                raise ValueError(f"{key} must be between 0.5 and 2, got {getattr(self, key)!r}")
        if self.spread < 0 or not 0 <= self.bolus_sd <= 0.3:
            raise ValueError(f"spread must be >= 0 and bolus_sd in [0, 0.3], got {self.spread!r}, {self.bolus_sd!r}")
        if len(self.placement_sd) != 3 or min(self.placement_sd) < 0:
            raise ValueError(f"placement_sd must be three lengths >= 0 in mm, got {self.placement_sd!r}")


def phantom_scanners(size: str = "small") -> dict[str, ScannerProfile]:
    """The scanners of the paper layout: one per site plus ``"external"``.

    They differ in every respect a real hospital does: phase (``site-spleen`` is non-contrast,
    ``site-kidney`` arterial, the rest portal-venous), noise level and texture (kernel),
    calibration offset, beam-hardening cupping, spacing, field of view (``site-pancreas`` crops the
    abdomen to a small field, ``site-spleen`` scans higher and ``site-kidney`` lower), on-disk
    orientation and file format. The external scanner matches none of them: the noisiest,
    softest-kernel and most cupped, with its own spacing, orientation and calibration.

    Args:
        size: ``"small"`` (2.5-3.5 mm pixels, 3-5 mm slices, < 1 M voxels: CPU) or ``"full"``
            (512 x 512 at 0.70-0.86 mm, 1-2.5 mm slices: GPU).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    # name: phase, noise sigma HU, offset HU, small (pixel, slice, fov), full (pixel, slice),
    # orientation, format, bolus, grain, scan centre z mm, cupping HU
    table = {
        "site-liver": ("portal-venous", 12.0, 0.0, (3.0, 4.0, (340.0, 260.0, 200.0)), (0.78, 1.25), "LPS", ".nii.gz", 1.00, 0.6, 105.0, 0.0),
        "site-spleen": ("non-contrast", 16.0, 3.0, (3.5, 5.0, (350.0, 270.0, 210.0)), (0.86, 2.5), "RAS", ".nrrd", 1.00, 0.8, 118.0, 12.0),
        "site-pancreas": ("portal-venous", 10.0, -2.0, (2.5, 3.0, (300.0, 240.0, 165.0)), (0.70, 1.0), "LAS", ".mha", 1.03, 0.5, 110.0, 0.0),
        "site-kidney": ("arterial", 14.0, 2.0, (2.8, 3.5, (345.0, 266.0, 224.0)), (0.82, 2.0), "PIR", ".nii.gz", 1.00, 0.7, 92.0, 6.0),
        "external": ("portal-venous", 20.0, -6.0, (3.2, 4.5, (360.0, 280.0, 216.0)), (0.74, 1.5), "RAI", ".nrrd", 0.97, 1.1, 100.0, 18.0),
    }  # fmt: skip
    scanners = {}
    for name, (
        phase,
        sigma,
        offset,
        (px, sl, fov),
        (fpx, fsl),
        orient,
        fmt,
        bolus,
        grain,
        centre,
        cup,
    ) in table.items():
        if size == "full":
            px, sl, fov = fpx, fsl, (512 * fpx, 512 * fpx, fov[2])
            grain = grain + 0.6  # finer voxels, same kernel in mm: noise correlated over more voxels
        scanners[name] = ScannerProfile(name, phase, sigma, offset, sl, px, fov, orient, fmt, bolus, grain, centre, cup)
    return scanners


def phantom_populations() -> dict[str, PatientPopulation]:
    """Who each site of the paper layout scans (and the external set).

    ``site-liver`` an average population; ``site-spleen`` heavier patients; ``site-pancreas``
    slimmer ones; ``site-kidney`` a wide mix; the external set average but varied. Every site
    places patients and starts its scans a little differently from case to case, and bolus
    timing varies between patients, so one site's few cases do not show it everything.
    """
    placement = (8.0, 6.0, 12.0)
    return {
        "site-liver": PatientPopulation("average", 1.0, 1.0, 1.0, 0.06, placement),
        "site-spleen": PatientPopulation("heavier", 1.04, 1.3, 1.0, 0.06, placement),
        "site-pancreas": PatientPopulation("slimmer", 0.97, 0.75, 1.0, 0.06, placement),
        "site-kidney": PatientPopulation("mixed", 1.0, 1.0, 1.3, 0.08, placement),
        "external": PatientPopulation("varied", 1.0, 1.1, 1.2, 0.08, placement),
    }


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Waves:
    """Low-frequency deformation: a sum of plane waves, evaluated at physical points."""

    k: np.ndarray  # (n, 3) rad/mm
    phase: np.ndarray  # (n,)
    amp: np.ndarray  # (n,)

    @staticmethod
    def draw(
        rng: np.random.Generator, amp: float, wavelengths: tuple[float, float] = (45.0, 110.0), n: int = 5
    ) -> _Waves:
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = d * (2 * np.pi / rng.uniform(*wavelengths, size=(n, 1)))
        return _Waves(k, rng.uniform(0, 2 * np.pi, n), amp * rng.uniform(0.5, 1.0, n) / np.sqrt(n / 2))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.float32)
        for (kx, ky, kz), ph, a in zip(self.k, self.phase, self.amp):
            out += np.float32(a) * np.sin(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(ph))
        return out


@dataclass(frozen=True)
class _Blob:
    """A deformed ellipsoid: centre (mm), semi-axes (mm), rotation (columns = local axes), waves."""

    center: np.ndarray
    axes: np.ndarray
    rot: np.ndarray
    waves: _Waves

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        r = self.rot.astype(np.float32)
        return (
            r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
        )

    @property
    def reach(self) -> float:
        return float(self.axes.max()) * 1.25


@dataclass(frozen=True)
class _Tube:
    """A tube: the union of spheres along densely sampled centre points, with per-point radii."""

    points: np.ndarray  # (m, 3)
    radii: np.ndarray  # (m,)
    kind: str = ""

    @staticmethod
    def through(control: np.ndarray, radii: np.ndarray, kind: str = "") -> _Tube:
        control = np.asarray(control, float)
        radii = np.asarray(radii, float) * np.ones(len(control))
        pts, rads = [control[:1]], [radii[:1]]
        for i in range(len(control) - 1):
            step = max(0.5, min(radii[i], radii[i + 1]) / 3.0)
            n = max(1, int(np.ceil(np.linalg.norm(control[i + 1] - control[i]) / step)))
            t = np.arange(1, n + 1)[:, None] / n
            pts.append(control[i] + t * (control[i + 1] - control[i]))
            rads.append(radii[i] + t[:, 0] * (radii[i + 1] - radii[i]))
        return _Tube(np.concatenate(pts), np.concatenate(rads), kind)


@dataclass(frozen=True)
class PhantomAnatomy:
    """One synthetic patient, independent of any scanner (see :func:`sample_anatomy`).

    Imaging the same anatomy with two scanner profiles gives the same patient in two protocols.
    """

    body: dict[str, float]
    organs: dict[str, _Blob]
    pancreas: _Tube
    vessels: tuple[_Tube, ...]
    bowel: tuple[_Tube, ...]
    stomach: _Blob
    gallbladder: _Blob
    spine_phase: float
    ribs: tuple[tuple[float, float], ...]
    enhancement: float
    texture_seed: int
    organ_waves: dict[str, _Waves] = field(default_factory=dict)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from small angles in degrees about x, y, z."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx_ = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry_ = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz_ = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz_ @ ry_ @ rx_


def _as_rng(rng_or_seed: Any) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def sample_anatomy(
    rng_or_seed: Any = 0, variation: float = 1.0, population: PatientPopulation | None = None
) -> PhantomAnatomy:
    """Draw one synthetic patient.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or anything ``default_rng`` takes.
        variation: scale of the inter-patient variation (0 gives the mean patient; 1 gives
            organ sizes about +-10-15 %, shifts of a few mm, rotations of a few degrees).
        population: whom the patient is drawn from (habitus, fat, spread, bolus timing);
            default: an average population.
    """
    if variation < 0:
        raise ValueError(f"variation must be >= 0, got {variation!r}")
    population = population or PatientPopulation()
    rng = _as_rng(rng_or_seed)
    v = float(variation) * population.spread

    def jitter(scale: float, size: Any = None) -> Any:
        return v * rng.normal(0.0, scale, size)

    def factor(spread: float, size: Any = None) -> Any:
        return 1.0 + v * rng.uniform(-spread, spread, size)

    shift = np.array([jitter(4.0), jitter(4.0), jitter(6.0)])
    habitus = population.habitus * factor(0.06)
    fat = float(np.clip(population.fat * (1.0 + jitter(0.25)), 0.55, 1.8))
    muscle = 11.0 * factor(0.15)
    # The cavity is set by the skeleton; fat and muscle add outwards (an obese patient is wider).
    body = {
        "fat_lat": 21.0 * fat,
        "fat_ant": 22.0 * fat,
        "fat_post": 13.0 * fat,
        "muscle": muscle,
        "x0": shift[0],
        "y0": shift[1],
        "z0": shift[2],
    }
    body["a"] = 120.0 * habitus * factor(0.03) + body["fat_lat"] + muscle
    body["b_ant"] = 71.0 * habitus * factor(0.03) + body["fat_ant"] + muscle
    body["b_post"] = 69.0 * habitus + body["fat_post"] + 26.0

    def blob(
        center: tuple[float, float, float],
        axes: tuple[float, float, float],
        volume_spread: float,
        rot: tuple[float, float, float] = (0.0, 0.0, 0.0),
        base: np.ndarray | None = None,
        pos_sd: float = 4.0,
        rot_sd: float = 4.0,
        wave_amp: float = 0.05,
    ) -> _Blob:
        c = np.asarray(center, float) + shift + jitter(pos_sd, 3)
        ratio = factor(0.07, 3)
        ratio /= np.prod(ratio) ** (1 / 3)  # shape change at constant volume...
        size = factor(volume_spread) ** (1 / 3)  # ...then the volume change itself
        r = _rotation(*(np.asarray(rot) + jitter(rot_sd, 3)))
        if base is not None:
            r = r @ base
        return _Blob(c, np.asarray(axes) * ratio * size, r, _Waves.draw(rng, wave_amp))

    organs: dict[str, _Blob] = {}
    organs["liver"] = blob((-52.0, -8.0, 118.0), (110.0, 86.0, 78.0), 0.1, wave_amp=0.06)
    # Spleen: long axis along the postero-lateral wall; local u points out of the body.
    spleen_frame = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    organs["spleen"] = blob((80.0, 30.0, 137.0), (30.0, 56.0, 50.0), 0.25, base=spleen_frame, wave_amp=0.05)
    # Kidneys: local u lateral, w along the long axis, upper pole tilted medially and posteriorly.
    for side, sign, z in (("kidney_right", -1.0, 76.0), ("kidney_left", 1.0, 86.0)):
        frame = _rotation(-14.0, -sign * 13.0, sign * 28.0) @ np.diag([sign, 1.0, 1.0])
        organs[side] = blob((sign * 77.0, 36.0, z), (29.0, 26.5, 58.0), 0.15, base=frame, wave_amp=0.035)

    # Pancreas: head by the duodenum on the right, neck anterior to the portal confluence, tail to the splenic hilum.
    p = np.array(
        [(-42, -38, 88), (-34, -44, 99), (-8, -52, 104), (22, -46, 110), (48, -28, 116), (66, -5, 121), (76, 12, 124)],
        float,
    )
    p += shift + jitter(3.0, (1, 3)) + jitter(2.0, p.shape)
    pr = np.array([17.5, 16.5, 12.0, 12.0, 11.0, 10.0, 7.5]) * factor(0.05) * factor(0.04, 7)
    pancreas = _Tube.through(p, pr, "pancreas")
    # Organ volumes as in adults (the cavity clips a drawn shape differently in every patient,
    # so the shape is rescaled to a drawn target volume): liver 1.3-1.7 L, spleen 170-270 mL,
    # each kidney 135-185 mL (+ a little for the parts the sinus and neighbours take).
    liver_ml, spleen_ml = 1500.0 * factor(0.12), 220.0 * factor(0.2)
    kidney_ml = (158.0 * factor(0.12), 158.0 * factor(0.12))
    organs["liver"] = _calibrated(organs["liver"], _liver_inside, body, liver_ml)
    organ_waves = {"pancreas": _Waves.draw(rng, 0.09, (18.0, 40.0), 6)}

    sp = shift[:2]
    vessels = [
        _Tube.through(
            np.array([(11, -22, 240), (11, -23, 120), (8, -20, 30), (5, -18, 14)]) + np.r_[sp, 0],
            10.5 * factor(0.08),
            "aorta",
        ),
        _Tube.through(np.array([(5, -18, 14), (36, -10, -40)]) + np.r_[sp, 0], 6.5, "aorta"),
        _Tube.through(np.array([(5, -18, 14), (-28, -10, -40)]) + np.r_[sp, 0], 6.5, "aorta"),
        _Tube.through(
            np.array([(-22, -18, -40), (-22, -20, 120), (-24, -4, 175), (-20, -2, 240)]) + np.r_[sp, 0],
            np.array([11.0, 11.0, 12.0, 12.0]),
            "ivc",
        ),
        # portal vein from the confluence behind the pancreatic neck to the liver hilum, then branches
        _Tube.through(
            np.array([(-10, -38, 100), (-30, -30, 118), (-48, -26, 130), (-85, -14, 136)])
            + np.r_[sp, 0]
            + np.r_[jitter(2.0, 2), 0],
            np.array([7.0, 7.0, 6.0, 4.0]),
            "portal_vein",
        ),
        _Tube.through(
            np.array([(-48, -26, 130), (-25, -45, 140), (5, -62, 146)]) + np.r_[sp, 0],
            np.array([5.0, 4.0, 3.0]),
            "portal_vein",
        ),
        # splenic vein along the back of the pancreas body and tail
        _Tube.through(p[2:] + np.array([0.0, 10.0, 0.0]), 4.0, "portal_vein"),
        # hepatic veins draining into the IVC below the diaphragm
        _Tube.through(
            np.array([(-100, -5, 150), (-60, 0, 168), (-26, -2, 180)]) + np.r_[sp, 0],
            np.array([3.5, 4.5, 6.0]),
            "hepatic_vein",
        ),
        _Tube.through(
            np.array([(-50, -55, 150), (-38, -25, 170), (-24, -4, 182)]) + np.r_[sp, 0],
            np.array([3.0, 4.0, 5.5]),
            "hepatic_vein",
        ),
        _Tube.through(
            np.array([(0, -60, 160), (-14, -28, 178), (-22, -6, 184)]) + np.r_[sp, 0],
            np.array([3.0, 3.5, 5.0]),
            "hepatic_vein",
        ),
    ]

    bowel: list[_Tube] = []
    # Duodenal C-loop around the pancreatic head (gas and fluid), then the colon frame and small bowel.
    duo = np.array(
        [
            (5, -62, 128),
            (-28, -58, 124),
            (-58, -40, 110),
            (-62, -34, 92),
            (-55, -34, 74),
            (-22, -42, 66),
            (10, -44, 70),
            (28, -40, 84),
        ],
        float,
    )
    bowel.append(_Tube.through(duo + shift + jitter(2.0, duo.shape), 11.0, "fluid"))
    colon = [
        np.array([(-98, -8, -20), (-100, -12, 40), (-96, -20, 92), (-80, -46, 104)], float),
        np.array([(-80, -46, 104), (-40, -64, 96), (0, -68, 92), (40, -64, 100), (70, -48, 118)], float),
        np.array([(70, -48, 118), (98, -10, 112), (102, 0, 60), (98, -8, -20)], float),
    ]
    for seg in colon:
        seg = seg + shift + jitter(3.0, seg.shape)
        tube = _Tube.through(seg, 21.0 * factor(0.12))
        s = np.arange(len(tube.radii))
        haustra = 1.0 + 0.12 * np.sin(2 * np.pi * s / max(3.0, 24.0 / (tube.radii.mean() / 3.0)))
        bowel.append(_Tube(tube.points, tube.radii * haustra, "stool"))
    for _ in range(18):
        start = np.array([rng.uniform(-65, 65), rng.uniform(-70, -10), rng.uniform(0, 78)]) + shift
        direction = rng.normal(size=3)
        pts = [start]
        for _step in range(14):
            direction = direction / np.linalg.norm(direction) + rng.normal(0, 0.7, 3)
            direction /= np.linalg.norm(direction)
            nxt = pts[-1] + 10.0 * direction
            lo, hi = np.array([-75, -78, -20]) + shift, np.array([75, 5, 88]) + shift
            bounced = (nxt < lo) | (nxt > hi)
            direction[bounced] *= -1
            pts.append(np.clip(nxt, lo, hi))
        kind = rng.choice(["fluid", "fluid", "fluid", "fluid", "mixed", "mixed", "gas"])
        bowel.append(_Tube.through(np.array(pts), rng.uniform(9.5, 12.5), str(kind)))

    stomach = blob((48.0, -44.0, 150.0), (40.0, 27.0, 44.0), 0.3, rot=(0.0, 25.0, -20.0), pos_sd=5.0, wave_amp=0.06)
    gallbladder = blob((-44.0, -56.0, 110.0), (13.0, 13.0, 28.0), 0.3, rot=(20.0, -15.0, 0.0), wave_amp=0.04)

    # Ribs: (level at the spine in mm, how far round they reach in degrees from the back).
    top = 205.0 + shift[2]
    ribs = tuple(
        (top + 30.0 - 25.0 * i + jitter(2.0), (150.0, 150.0, 140.0, 125.0, 105.0, 75.0)[i] + jitter(5.0))
        for i in range(6)
    )
    anatomy = PhantomAnatomy(
        body=body,
        organs=organs,
        pancreas=pancreas,
        vessels=tuple(vessels),
        bowel=tuple(bowel),
        stomach=stomach,
        gallbladder=gallbladder,
        spine_phase=float(rng.uniform(0, 34.0)) + float(shift[2]),
        ribs=ribs,
        enhancement=float(
            np.clip(1.0 + jitter(population.bolus_sd), 1 - 2 * population.bolus_sd, 1 + 2 * population.bolus_sd)
        ),
        texture_seed=int(rng.integers(2**31)),
        organ_waves=organ_waves,
    )
    # Neighbours (kidney, pancreas, vessels, the scan range) take a different share of each organ
    # in every patient: measure the finished phantom coarsely and rescale to the target volumes.
    targets = {"liver": liver_ml, "spleen": spleen_ml, "kidney_right": kidney_ml[0], "kidney_left": kidney_ml[1]}
    return _volume_corrected(anatomy, targets)


def _volume_corrected(anatomy: PhantomAnatomy, targets: dict[str, float], passes: int = 2) -> PhantomAnatomy:
    grid = _Grid(ScannerProfile(pixel_spacing=4.5, slice_thickness=4.5, fov=(360.0, 279.0, 198.0)))
    voxel_ml = 4.5**3 / 1000.0
    x_mid = anatomy.body["x0"]
    for _ in range(passes):
        _, labels = _rasterise(anatomy, grid)
        right = (grid.xs < x_mid)[None, None, :]
        measured = {
            "liver": (labels == 1).sum(),
            "spleen": (labels == 2).sum(),
            "kidney_right": ((labels == 4) & right).sum(),
            "kidney_left": ((labels == 4) & ~right).sum(),
        }
        organs = dict(anatomy.organs)
        for name, target in targets.items():
            ml = float(measured[name]) * voxel_ml
            if ml > 0:
                b = organs[name]
                organs[name] = _Blob(
                    b.center, b.axes * float(np.clip(target / ml, 0.8, 1.25)) ** (1 / 3), b.rot, b.waves
                )
        anatomy = replace(anatomy, organs=organs)
    return anatomy


# --------------------------------------------------------------------------------------------
# Rasterisation on the LPS grid
# --------------------------------------------------------------------------------------------


class _Grid:
    """The identity-direction (LPS) grid of one scanner; arrays are indexed [z, y, x]."""

    def __init__(self, scanner: ScannerProfile, offset: Any = (0.0, 0.0, 0.0)) -> None:
        self.size = scanner.grid_size
        self.spacing = scanner.spacing
        nx, ny, nz = self.size
        sx, sy, sz = self.spacing
        dx, dy, dz = (float(o) for o in offset)
        self.origin = (
            dx - (nx - 1) * sx / 2,
            dy - (ny - 1) * sy / 2,
            scanner.scan_center_z + dz - (nz - 1) * sz / 2,
        )
        self.xs = (self.origin[0] + sx * np.arange(nx)).astype(np.float32)
        self.ys = (self.origin[1] + sy * np.arange(ny)).astype(np.float32)
        self.zs = (self.origin[2] + sz * np.arange(nz)).astype(np.float32)
        self.shape = (nz, ny, nx)

    def box(
        self, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Slices covering physical [lo, hi] and broadcastable coordinates X (1,1,n), Y (1,n,1), Z (n,1,1)."""
        out = []
        for axis, coords in enumerate((self.xs, self.ys, self.zs)):
            i0 = int(np.searchsorted(coords, lo[axis], "left"))
            i1 = int(np.searchsorted(coords, hi[axis], "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        sx, sy, sz = out
        return ((sz, sy, sx), self.xs[sx][None, None, :], self.ys[sy][None, :, None], self.zs[sz][:, None, None])

    def blob_box(self, blob: _Blob):
        return self.box(blob.center - blob.reach, blob.center + blob.reach)


def _tube_q2(grid: _Grid, tube: _Tube, margin: float = 1.0):
    """Normalised squared distance q^2 = min_i |p - c_i|^2 / r_i^2 inside the tube's bounding box."""
    reach = tube.radii[:, None] * margin + 1.0
    box = grid.box((tube.points - reach).min(0), (tube.points + reach).max(0))
    if box is None:
        return None
    sl, X, Y, Z = box
    q2 = np.full((Z.shape[0], Y.shape[1], X.shape[2]), np.inf, np.float32)
    x0, y0, z0 = sl[2].start, sl[1].start, sl[0].start
    for c, r in zip(tube.points, tube.radii):
        sub = grid.box(c - r * margin - 1.0, c + r * margin + 1.0)
        if sub is None:
            continue
        (bz, by, bx), sx_, sy_, sz_ = sub
        local = (
            slice(bz.start - z0, bz.stop - z0),
            slice(by.start - y0, by.stop - y0),
            slice(bx.start - x0, bx.stop - x0),
        )
        inv = np.float32(1.0 / (r * r))
        d2 = ((sx_ - c[0]) ** 2 * inv) + ((sy_ - c[1]) ** 2 * inv) + ((sz_ - c[2]) ** 2 * inv)
        np.minimum(q2[local], d2, out=q2[local])
    return sl, X, Y, Z, q2


def _superellipse(
    x: np.ndarray, y: np.ndarray, a: float, b_ant: float, b_post: float, n_ant: float = 2.2, n_post: float = 3.0
) -> np.ndarray:
    """Body-outline function: < 1 inside. Flatter at the back (n_post), rounder in front."""
    a, b_ant, b_post = max(a, 1.0), max(b_ant, 1.0), max(b_post, 1.0)
    ant = (np.abs(x) / a) ** n_ant + (np.abs(np.minimum(y, 0)) / b_ant) ** n_ant
    post = (np.abs(x) / a) ** n_post + (np.maximum(y, 0) / b_post) ** n_post
    return np.where(y < 0, ant, post)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _liver_inside(lv: _Blob, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Liver: a wedge, thick on the right, thinning into the left lobe which sits anterior and higher."""
    u, v, w = lv.local(x, y, z)
    a_, b_, c_ = lv.axes
    s = _smoothstep((u / a_ + 0.15) / 1.15)
    bb, cc = b_ * (1.0 - 0.42 * s), c_ * (1.0 - 0.55 * s)
    vv, ww = v + 0.32 * b_ * s, w - 0.32 * c_ * s
    cc = np.where(ww < 0, cc * 0.85, cc)  # flatter visceral (inferior) surface
    return np.sqrt((u / a_) ** 2 + (vv / bb) ** 2 + (ww / cc) ** 2) + lv.waves(x, y, z) < 1.0


def _spleen_inside(spl: _Blob, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Spleen: a crescent following the postero-lateral wall, concave hilum medially."""
    u, v, w = spl.local(x, y, z)
    a_, b_, c_ = spl.axes
    ub = u + 0.005 * v * v
    q = np.sqrt((ub / a_) ** 2 + (v / b_) ** 2 + (w / c_) ** 2) + spl.waves(x, y, z)
    hilum = ((ub + 1.05 * a_) / (0.6 * a_)) ** 2 + (v / (0.33 * b_)) ** 2 + (w / (0.4 * c_)) ** 2 < 1.0
    return (q < 1.0) & ~hilum


def _kidney_parts(kd: _Blob, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
    """Kidney bean: (parenchyma, sinus, sinus_q, q, psi); the sinus opens at the medial hilum."""
    u, v, w = kd.local(x, y, z)
    a_, b_, c_ = kd.axes
    ub = u + 0.004 * w * w
    q = np.sqrt((ub / a_) ** 2 + (v / b_) ** 2 + (w / c_) ** 2) + kd.waves(x, y, z)
    kidney = q < 1.0
    sinus_q = np.sqrt(((ub + a_) / (1.05 * a_)) ** 2 + ((v + 0.15 * b_) / (0.42 * b_)) ** 2 + (w / (0.5 * c_)) ** 2)
    sinus = kidney & (sinus_q < 1.0)
    return kidney & ~sinus, sinus, sinus_q, q, np.arctan2(w / c_, v / b_)


def _cavity_inside(body: dict[str, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The peritoneal/retroperitoneal cavity inside the muscle wall (2-D, no z wobble)."""
    m = body["muscle"]
    return (
        _superellipse(
            x - body["x0"],
            y - body["y0"],
            body["a"] - body["fat_lat"] - m,
            body["b_ant"] - body["fat_ant"] - m,
            body["b_post"] - body["fat_post"] - 26.0,
        )
        < 1.0
    )


def _organ_space(body: dict[str, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the solid organs may lie: the cavity less the spine, crura and great vessels."""
    retro = ((x - body["x0"]) / 42.0) ** 2 + ((y - body["y0"] - 18.0) / 44.0) ** 2 < 1.0
    return _cavity_inside(body, x, y) & ~retro


def _calibrated(
    blob: _Blob, inside: Any, body: dict[str, float], target_ml: float, taken: tuple[Any, ...] = (), step: float = 5.0
) -> _Blob:
    """Rescale a blob so that its shape, clipped to the organ space and less what the organs in
    ``taken`` occupy, has ``target_ml`` (two passes)."""
    for _ in range(1):
        r = blob.reach
        axes1d = [np.arange(c - r, c + r + step, step, dtype=np.float32) for c in blob.center]
        x, y, z = axes1d[0][None, None, :], axes1d[1][None, :, None], axes1d[2][:, None, None]
        mask = inside(blob, x, y, z) & _organ_space(body, x, y)
        for other in taken:
            mask &= ~other(x, y, z)
        ml = float(mask.sum()) * step**3 / 1000.0
        if ml <= 0:
            break
        blob = _Blob(blob.center, blob.axes * (target_ml / ml) ** (1 / 3), blob.rot, blob.waves)
    return blob


def _rasterise(anat: PhantomAnatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes and SegViz labels on the LPS grid (painted in order: later wins)."""
    tissue = np.zeros(grid.shape, np.uint8)
    labels = np.zeros(grid.shape, np.uint8)
    bd = anat.body
    x2 = (grid.xs[None, :] - bd["x0"]).astype(np.float32)
    y2 = (grid.ys[:, None] - bd["y0"]).astype(np.float32)
    a, ba, bp = bd["a"], bd["b_ant"], bd["b_post"]

    # Body wall, as 2-D outlines (the abdomen changes little over 20 cm) with a slow wobble along z.
    wobble = 1.0 + 0.02 * np.sin((grid.zs - bd["z0"]) / 40.0 + 1.0)
    outline = np.stack([_superellipse(x2 / w, y2 / w, a, ba, bp) for w in np.unique(np.round(wobble, 3))])
    wob_index = np.searchsorted(np.unique(np.round(wobble, 3)), np.round(wobble, 3))
    body = outline[wob_index] < 1.0

    def layer(shrink_lat: float, shrink_ant: float, shrink_post: float) -> np.ndarray:
        inner = np.stack(
            [
                _superellipse(x2 / w, y2 / w, a - shrink_lat, ba - shrink_ant, bp - shrink_post)
                for w in np.unique(np.round(wobble, 3))
            ]
        )
        return inner[wob_index] < 1.0

    tissue[body] = T["skin"]
    tissue[layer(2.5, 2.5, 2.5)] = T["fat"]
    m = bd["muscle"]
    tissue[layer(bd["fat_lat"], bd["fat_ant"], bd["fat_post"])] = T["muscle"]
    cavity = layer(bd["fat_lat"] + m, bd["fat_ant"] + m, bd["fat_post"] + 26.0)
    # Linea alba: the rectus muscles part in the midline, so fat shows through anteriorly.
    tissue[cavity] = T["visceral_fat"]

    # Table under the patient (a curved carbon-fibre shell).
    yt = bp + bd["y0"] + 10.0 + 0.0006 * (grid.xs[None, :] - bd["x0"]) ** 2
    table2 = ((grid.ys[:, None] > yt) & (grid.ys[:, None] < yt + 5.0)) | (
        (grid.ys[:, None] > yt + 22.0) & (grid.ys[:, None] < yt + 26.0)
    )
    table2 &= np.abs(grid.xs[None, :] - bd["x0"]) < 0.8 * a
    tissue[:, table2] = T["table"]

    # Muscles of the back: erector spinae, quadratus lumborum, psoas (grows towards the pelvis).
    X, Y, Z = grid.xs[None, None, :] - bd["x0"], grid.ys[None, :, None] - bd["y0"], grid.zs[:, None, None]
    for sign in (-1.0, 1.0):
        erector = ((x2 - sign * 34.0) / 27.0) ** 2 + ((y2 - 70.0) / 24.0) ** 2 < 1.0
        tissue[:, erector] = T["muscle"]
        ql = ((x2 - sign * 64.0) / 17.0) ** 2 + ((y2 - 66.0) / 12.0) ** 2 < 1.0
        tissue[(Z[:, 0, 0] < 110.0 + bd["z0"])[:, None, None] & ql[None]] = T["muscle"]
        psoas_r = np.clip((150.0 + bd["z0"] - Z) * 0.16, 0.0, 24.0)
        psoas = ((X - sign * (30.0 + 0.35 * psoas_r)) ** 2 + ((Y - 8.0) * 1.1) ** 2) < psoas_r**2
        tissue[psoas] = T["muscle"]

    # Bowel: wall, lumen content (fluid, gas, or stool with gas bubbles; gas rises anteriorly).
    rng_tex = np.random.default_rng(anat.texture_seed)
    for tube in anat.bowel:
        res = _tube_q2(grid, tube)
        if res is None:
            continue
        sl, _Xb, Yb, _Zb, q2 = res
        inside = (q2 < 1.0) & cavity[sl]
        wall_ratio = float(np.clip(1.0 - 3.0 / tube.radii.mean(), 0.5, 0.9)) ** 2
        lumen = inside & (q2 < wall_ratio)
        view_t = tissue[sl]
        view_t[inside] = T["bowel_wall"]
        if tube.kind == "stool":
            view_t[lumen] = T["stool"]
            gas_level = float(tube.points[:, 1].mean()) - 8.0 + rng_tex.uniform(-6, 6)
            view_t[lumen & (Yb < gas_level)] = T["gas"]
        elif tube.kind == "gas":
            view_t[lumen] = T["gas"]
        elif tube.kind == "mixed":
            view_t[lumen] = T["fluid"]
            view_t[lumen & (Yb < float(tube.points[:, 1].mean()) - 2.0)] = T["gas"]
        else:
            view_t[lumen] = T["fluid"]
            view_t[lumen & (Yb < float(tube.points[:, 1].min()) - 4.0)] = T["gas"]

    # Stomach: wall, fluid, and an air-fluid level (gas on top: anterior when supine).
    st = anat.stomach
    box = grid.blob_box(st)
    if box is not None:
        sl, Xs, Ys, Zs = box
        u, v, w = st.local(Xs, Ys, Zs)
        q = np.sqrt((u / st.axes[0]) ** 2 + (v / st.axes[1]) ** 2 + (w / st.axes[2]) ** 2) + st.waves(Xs, Ys, Zs)
        inside = (q < 1.0) & cavity[sl]
        lumen = inside & (q < 1.0 - 5.0 / st.axes.min())
        view_t = tissue[sl]
        view_t[inside] = T["bowel_wall"]
        view_t[lumen] = T["fluid"]
        view_t[lumen & (Ys < st.center[1] - 0.25 * st.axes[1])] = T["gas"]

    space = _organ_space(bd, grid.xs[None, :], grid.ys[:, None])

    def paint_organ(name: str, mask: np.ndarray, sl: tuple[slice, slice, slice], code: int, label: int) -> None:
        mask = mask & cavity[sl] & space[sl[1:]]
        tissue[sl][mask] = code
        labels[sl][mask] = label

    # Liver: a wedge, thick on the right, thinning into the left lobe which sits anterior and higher.
    lv = anat.organs["liver"]
    box = grid.blob_box(lv)
    if box is not None:
        sl, Xs, Ys, Zs = box
        paint_organ("liver", _liver_inside(lv, Xs, Ys, Zs), sl, T["liver"], 1)
    gb = anat.gallbladder
    box = grid.blob_box(gb)
    if box is not None:
        sl, Xs, Ys, Zs = box
        u, v, w = gb.local(Xs, Ys, Zs)
        inside = (
            np.sqrt((u / gb.axes[0]) ** 2 + (v / gb.axes[1]) ** 2 + (w / gb.axes[2]) ** 2) + gb.waves(Xs, Ys, Zs) < 1.0
        )
        inside &= cavity[sl]
        tissue[sl][inside] = T["bile"]
        labels[sl][inside] = 0

    # Spleen: a crescent following the postero-lateral wall, concave hilum medially.
    spl = anat.organs["spleen"]
    box = grid.blob_box(spl)
    if box is not None:
        sl, Xs, Ys, Zs = box
        paint_organ("spleen", _spleen_inside(spl, Xs, Ys, Zs), sl, T["spleen"], 2)

    # Pancreas: a lobulated curved tube.
    res = _tube_q2(grid, anat.pancreas, margin=1.15)
    if res is not None:
        sl, Xp, Yp, Zp, q2 = res
        q = np.sqrt(q2) + anat.organ_waves["pancreas"](Xp, Yp, Zp)
        paint_organ("pancreas", q < 1.0, sl, T["pancreas"], 3)

    # Kidneys: beans with cortex, medullary pyramids and a renal sinus opening at the hilum.
    for side in ("kidney_right", "kidney_left"):
        kd = anat.organs[side]
        box = grid.blob_box(kd)
        if box is None:
            continue
        sl, Xs, Ys, Zs = box
        parenchyma, sinus, sinus_q, q, psi = _kidney_parts(kd, Xs, Ys, Zs)
        pyramids = parenchyma & (q > 0.42) & (q < 0.78) & (np.cos(7.0 * psi) > -0.35)
        paint_organ(side, parenchyma, sl, T["kidney_cortex"], 4)
        tissue[sl][pyramids & cavity[sl]] = T["kidney_medulla"]
        s_mask = sinus & cavity[sl]
        tissue[sl][s_mask] = T["renal_sinus"]
        tissue[sl][s_mask & (sinus_q < 0.55)] = T["fluid"]  # renal pelvis
        labels[sl][s_mask] = 0

    # Vessels. Inside the liver the portal and hepatic veins stay liver (as annotators draw it);
    # the aorta, IVC and extrahepatic veins are not part of any organ.
    for tube in anat.vessels:
        res = _tube_q2(grid, tube)
        if res is None:
            continue
        sl, _, _, _, q2 = res
        inside = q2 < 1.0
        if tube.kind in ("portal_vein", "hepatic_vein"):
            keep = labels[sl] == 1
            tissue[sl][inside] = T[tube.kind]
            lab = labels[sl]
            lab[inside & ~keep] = 0
        else:
            tissue[sl][inside] = T[tube.kind]
            labels[sl][inside] = 0

    # Diaphragm and lung bases: the posterior costophrenic recesses reach lowest.
    z_lung = 202.0 + bd["z0"] - 0.008 * ((np.abs(X) - 65.0) ** 2 + (Y + 10.0) ** 2)
    thorax = layer(bd["fat_lat"] + 4.0, bd["fat_ant"] + 4.0, bd["fat_post"] + 20.0)
    allowed = thorax & (np.abs(X) > 28.0) & (labels == 0) & (tissue != T["muscle"])
    tissue[allowed & (Z > z_lung - 6.0)] = T["muscle"]
    tissue[allowed & (Z > z_lung)] = T["lung"]

    # Spine: vertebral bodies and discs (34 mm period), canal, posterior elements; then ribs.
    bone = np.zeros(grid.shape, bool)
    phase = np.mod(grid.zs - anat.spine_phase, 34.0)
    disc_z = (phase < 8.0)[:, None, None]
    vb = ((x2 / 22.0) ** 2 + ((y2 - 8.0) / 17.0) ** 2 < 1.0)[None]
    tissue[vb & disc_z] = T["disc"]
    bone |= vb & ~disc_z
    r_canal = np.hypot(x2, y2 - 35.0)
    canal = (r_canal < 9.0)[None]
    ring = ((r_canal >= 9.0) & (r_canal < 15.0) & (y2 > 24.0))[None]
    spinous = ((np.abs(x2) < 4.0 + 0.05 * (y2 - 45.0)) & (y2 > 42.0) & (y2 < 86.0))[None] & (
        (phase > 9.0) & (phase < 24.0)
    )[:, None, None]
    transverse = ((np.abs(y2 - 34.0) < 4.0) & (np.abs(x2) > 10.0) & (np.abs(x2) < 42.0))[None] & (
        (phase > 12.0) & (phase < 22.0)
    )[:, None, None]
    bone |= ring | spinous | transverse
    tissue[np.broadcast_to(canal, grid.shape)] = T["csf"]

    # Ribs: oblique bony bands in the body wall, descending as they curve forward.
    phi = np.degrees(np.arctan2(np.abs(x2), y2 - 20.0))  # 0 = back, 90 = side, 180 = front
    rho = np.hypot(x2, y2 - 20.0)
    theta = np.arctan2(y2 - 20.0, x2)
    ra, rb = a - bd["fat_lat"] - 0.5 * m, 0.5 * ((ba - bd["fat_ant"]) + (bp - bd["fat_post"])) - 0.5 * m
    r_rib = ra * rb / np.sqrt((rb * np.cos(theta)) ** 2 + (ra * np.sin(theta)) ** 2)
    ring2 = (np.abs(rho - r_rib) < 7.0) & (phi > 28.0)
    iy, ix = np.nonzero(ring2)
    if iy.size:
        dr = ((rho - r_rib)[iy, ix] / 4.0) ** 2
        ph = phi[iy, ix]
        for level, reach in anat.ribs:
            z_rib = level - 0.9 * (ph - 28.0)
            ok = ph < reach
            hit = (((grid.zs[:, None] - z_rib[None, :]) / 5.5) ** 2 + dr[None, :] < 1.0) & ok[None, :]
            iz, j = np.nonzero(hit)
            bone[iz, iy[j], ix[j]] = True
    bone &= body
    labels[bone] = 0
    cancellous = ndimage.binary_erosion(bone, iterations=1, structure=ndimage.generate_binary_structure(3, 1))
    tissue[bone] = T["bone_cortical"]
    tissue[cancellous] = T["bone_cancellous"]
    return tissue, labels


# --------------------------------------------------------------------------------------------
# Intensities and the scanner
# --------------------------------------------------------------------------------------------


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    white = rng.standard_normal(shape, dtype=np.float32)
    if max(sigma) <= 0:
        return white
    smooth = ndimage.gaussian_filter(white, sigma, mode="wrap")
    std = float(smooth.std())
    return smooth / np.float32(std if std > 0 else 1.0)


def _intensities(
    tissue: np.ndarray, anat: PhantomAnatomy, scanner: ScannerProfile, grid: _Grid, noise_rng: np.random.Generator
) -> np.ndarray:
    column = _PHASE_COLUMN[scanner.phase]
    boost = scanner.contrast_scale * anat.enhancement
    names = sorted(TISSUES, key=TISSUES.get)
    base = np.array([_HU[n][0] + boost * (_HU[n][column] - _HU[n][0]) for n in names], np.float32)
    amp = np.array([_HU[n][3] for n in names], np.float32)
    hu = base[tissue]
    sx, sy, sz = grid.spacing
    tex_rng = np.random.default_rng(anat.texture_seed)
    texture = _unit_noise(tex_rng, grid.shape, (2.0 / sz, 2.0 / sy, 2.0 / sx))
    hu += amp[tissue] * texture
    # Stool is mottled with small gas bubbles.
    stool = tissue == T["stool"]
    if stool.any():
        bubbles = _unit_noise(tex_rng, grid.shape, (1.2 / sz, 1.2 / sy, 1.2 / sx))
        hu[stool & (bubbles > 1.1)] = -900.0
    # Partial volume: a slice profile wider than the pixel footprint.
    hu = ndimage.gaussian_filter(hu, (0.5, 0.4, 0.4))
    if scanner.noise_sigma > 0:
        g = scanner.noise_grain
        hu += np.float32(scanner.noise_sigma) * _unit_noise(noise_rng, grid.shape, (0.5 * g, g, g))
    if scanner.cupping > 0:
        # Beam hardening: rays through the middle of the body are hardest, so it reads lowest.
        bd = anat.body
        xn = (grid.xs[None, :] - bd["x0"]) / bd["a"]
        yn = (grid.ys[:, None] - bd["y0"]) / np.where(grid.ys[:, None] < bd["y0"], bd["b_ant"], bd["b_post"])
        cup = np.float32(scanner.cupping) * np.clip(1.0 - (xn**2 + yn**2), 0.0, 1.0).astype(np.float32)
        hu -= np.where(tissue != T["air"], cup[None], np.float32(0.0))
    hu += np.float32(scanner.intensity_offset)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _to_image(array: np.ndarray, grid: _Grid, orientation: str) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    return sitk.DICOMOrient(image, orientation)


def make_phantom_case(
    rng_or_seed: Any,
    scanner: ScannerProfile,
    *,
    anatomy: PhantomAnatomy | None = None,
    variation: float = 1.0,
    population: PatientPopulation | None = None,
    return_tissues: bool = False,
) -> tuple[sitk.Image, ...]:
    """Image one synthetic patient with one scanner.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or a seed; the same seed gives byte-identical
            images.
        scanner: the scanner and protocol.
        anatomy: image this patient (from :func:`sample_anatomy`) instead of drawing one; the
            generator then only draws the scanner noise.
        variation: inter-patient variation when drawing the anatomy (see :func:`sample_anatomy`).
        population: whom the patient is drawn from and how patients are placed in the scanner
            (default: an average population, always centred).
        return_tissues: also return the tissue-class map (values of ``TISSUES``).

    Returns:
        ``(ct, labels)`` or ``(ct, labels, tissues)``: SimpleITK images of identical geometry in
        the scanner's on-disk orientation. ``ct`` is int16 HU; ``labels`` uint8 with the SegViz
        values (1 liver, 2 spleen, 3 pancreas, 4 kidney, 0 elsewhere).

    Example::

        ct, labels = make_phantom_case(3, ScannerProfile(phase="non-contrast", orientation="RAS"))
    """
    if not isinstance(scanner, ScannerProfile):
        raise TypeError(f"scanner must be a ScannerProfile, got {type(scanner).__name__}")
    rng = _as_rng(rng_or_seed)
    population = population or PatientPopulation()
    if anatomy is None:
        anatomy = sample_anatomy(rng, variation, population)
    noise_rng = np.random.default_rng(rng.integers(2**63))
    # Where this patient lies in the field of view, and where the technologist started the scan.
    placement = rng.normal(0.0, population.placement_sd) if any(population.placement_sd) else np.zeros(3)
    grid = _Grid(scanner, offset=placement)
    tissue, labels = _rasterise(anatomy, grid)
    ct = _intensities(tissue, anatomy, scanner, grid, noise_rng)
    out = [_to_image(ct, grid, scanner.orientation), _to_image(labels, grid, scanner.orientation)]
    if return_tissues:
        out.append(_to_image(tissue, grid, scanner.orientation))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Site folders
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomLayout:
    """Where :func:`generate_phantom_sites` wrote the data.

    Args:
        sites: the training site folders (one organ annotated each in the paper layout).
        external: the fully-labelled external test folder.
    """

    sites: list[Path]
    external: Path

    @property
    def root(self) -> Path:
        """The folder holding the sites and ``phantom.json``."""
        return self.external.parent


def _write_site_json(folder: Path, name: str, organs: list[str]) -> None:
    organs = [organ_by_name(o).name for o in organs]
    labels = {str(i + 1): organ for i, organ in enumerate(organs)}
    (folder / "site.json").write_text(
        json.dumps({"name": name, "organs": organs, "labels": labels}, indent=2) + "\n", encoding="utf-8"
    )


def generate_phantom_sites(
    out_dir: str | Path,
    size: str = "small",
    seed: int = 0,
    layout: str = "paper",
    cases_per_site: int | None = None,
    external_cases: int | None = None,
    force: bool = False,
    progress: ProgressReporter | None = None,
) -> PhantomLayout:
    """Write the synthetic sites: ``site-liver``, ``site-spleen``, ``site-pancreas``,
    ``site-kidney`` (each annotating only its organ, as label value 1) and ``external`` (all four
    organs, labels 1 liver, 2 spleen, 3 pancreas, 4 kidney), plus ``phantom.json`` (provenance).

    Each folder holds ``site.json``, ``images/caseNNN<ext>`` and ``labels/caseNNN<ext>`` in the
    scanner's file format and orientation (see :func:`phantom_scanners`), of patients drawn from the
    site's population (:func:`phantom_populations`). Case ``k`` of a site depends only on ``seed``,
    the site and ``k``: a phantom with more cases per site holds the same first cases (nested
    training sets for a learning curve). Everything is written to a temporary folder first and
    moved into place at the end, so an error leaves nothing behind.

    Args:
        out_dir: the folder to create (or fill); must be empty or absent unless ``force``.
        size: ``"small"`` (CPU; default 4 cases per site, 4 external) or ``"full"`` (real CT
            resolution; 12 per site, 8 external).
        seed: the same seed writes byte-identical voxels.
        layout: ``"paper"``.
        cases_per_site: cases per training site (default by size; a learning curve up to 8
            training cases per site needs 8 plus its validation cases).
        external_cases: cases in the external set (default by size; at least 12 for a paired
            test that can reach p < 0.05 after correction).
        force: replace the phantom folders in a non-empty ``out_dir`` (other files are kept).
        progress: where to report progress.

    Raises:
        SegVizInputError: ``out_dir`` is a file, or non-empty without ``force``.
        ValueError: an unknown size or layout, or a case count below 1.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n_site = (4 if size == "small" else 12) if cases_per_site is None else int(cases_per_site)
    n_ext = (4 if size == "small" else 8) if external_cases is None else int(external_cases)
    if n_site < 1 or n_ext < 1:
        raise ValueError(f"cases_per_site and external_cases must be >= 1, got {n_site}, {n_ext}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SegVizInputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SegVizInputError(
            out, "folder is not empty; choose an empty folder or pass force=True to replace the phantom data in it"
        )
    progress = progress or ProgressReporter("none")
    scanners = phantom_scanners(size)
    populations = phantom_populations()
    plan = [(name, [organ], scanners[name], n_site) for name, organ in PAPER_SITES]
    plan.append((EXTERNAL_NAME, [o.name for o in ORGANS], scanners[EXTERNAL_NAME], n_ext))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    started = time.perf_counter()
    try:
        progress.emit("stage", stage="phantom", message=f"writing {len(plan)} phantom sites ({size}) to {out}")
        with progress.task("phantom", total=sum(p[3] for p in plan)) as advance:
            for site_index, (name, organs, scanner, n_cases) in enumerate(plan):
                folder = tmp / name
                (folder / "images").mkdir(parents=True)
                (folder / "labels").mkdir()
                _write_site_json(folder, name, organs)
                # Label values of this site: its organs renumbered 1..n as declared in site.json.
                lut = np.zeros(256, np.uint8)
                for local, organ in enumerate(organs, start=1):
                    lut[organ_by_name(organ).label] = local
                for case in range(n_cases):
                    rng = np.random.default_rng([seed, site_index, case])
                    ct, labels = make_phantom_case(rng, scanner, population=populations[name])
                    local_labels = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(labels)])
                    local_labels.CopyInformation(labels)
                    file = f"case{case:03d}{scanner.file_format}"
                    sitk.WriteImage(ct, str(folder / "images" / file), useCompression=True)
                    sitk.WriteImage(local_labels, str(folder / "labels" / file), useCompression=True)
                    advance(site=name)
        manifest = {
            "generator": "SegVizLogic.phantom",
            "layout": layout,
            "size": size,
            "seed": seed,
            "sites": {
                name: {"organs": organs, "cases": n, "scanner": asdict(sc), "population": asdict(populations[name])}
                for name, organs, sc, n in plan
            },
        }
        (tmp / "phantom.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.is_dir():
            for child in sorted(tmp.iterdir()):
                target = out / child.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.replace(child, target)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.emit(
        "stage", stage="phantom", message=f"phantom written to {out} in {time.perf_counter() - started:.1f} s"
    )
    return PhantomLayout(sites=[out / name for name, _ in PAPER_SITES], external=out / EXTERNAL_NAME)


# --------------------------------------------------------------------------------------------
# Montage
# --------------------------------------------------------------------------------------------


def render_phantom_montage(layout: PhantomLayout, path: str | Path, case: int = 0) -> Path:
    """Draw one case of every site: two axial slices and one coronal, W400 L40, label overlays.

    Images are reoriented to LPS for display, so every panel is in radiological convention
    (patient right on the image left, anterior up; head up in the coronal view) whatever the
    on-disk orientation.

    Args:
        layout: what :func:`generate_phantom_sites` returned.
        path: the PNG to write.
        case: which case of each site to show.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    folders = [*layout.sites, layout.external]
    manifest_path = layout.root / "phantom.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {"sites": {}}
    fig, axes = plt.subplots(
        len(folders), 3, figsize=(12.5, 3.1 * len(folders)), gridspec_kw={"width_ratios": [1.3, 1.3, 0.95]}
    )
    fig.patch.set_facecolor("black")
    for row, folder in enumerate(folders):
        info = json.loads((folder / "site.json").read_text(encoding="utf-8"))
        image_file = sorted((folder / "images").iterdir())[case]
        ct = sitk.DICOMOrient(sitk.ReadImage(str(image_file)), "LPS")
        lab = sitk.DICOMOrient(sitk.ReadImage(str(folder / "labels" / image_file.name)), "LPS")
        arr, larr = sitk.GetArrayFromImage(ct).astype(np.float32), sitk.GetArrayFromImage(lab)
        sx, sy, sz = ct.GetSpacing()
        ox, oy, oz = ct.GetOrigin()
        nz, ny, nx = arr.shape
        colours = [(0, 0, 0, 0)] + [
            (*organ_by_name(info["labels"][str(k)]).colour_float, 0.45) if str(k) in info["labels"] else (0, 0, 0, 0)
            for k in range(1, 8)
        ]
        cmap = ListedColormap(colours)
        scanner = manifest["sites"].get(info["name"], {}).get("scanner", {})
        stem = image_file.name.split(".")[0]
        ext = image_file.name[len(stem) :]
        orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            sitk.ReadImage(str(image_file)).GetDirection()
        )
        title = f"{info['name']} · {scanner.get('phase', '?')} · {scanner.get('pixel_spacing', sx):g}×{scanner.get('pixel_spacing', sy):g}×{scanner.get('slice_thickness', sz):g} mm · {orient} {ext}"
        # Axial levels in patient z: upper abdomen (liver, spleen, stomach) and renal hilum.
        for col, z_mm in enumerate((150.0, 95.0)):
            k = int(np.clip(round((z_mm - oz) / sz), 0, nz - 1))
            ax = axes[row, col]
            extent = (ox - sx / 2, ox + (nx - 0.5) * sx, oy + (ny - 0.5) * sy, oy - sy / 2)
            ax.imshow(arr[k], cmap="gray", vmin=-160, vmax=240, extent=extent, interpolation="bilinear")
            ax.imshow(larr[k], cmap=cmap, vmin=0, vmax=7, extent=extent, interpolation="nearest")
            if larr[k].any():
                ax.contour(
                    np.linspace(ox, ox + (nx - 1) * sx, nx),
                    np.linspace(oy, oy + (ny - 1) * sy, ny),
                    (larr[k] > 0).astype(float),
                    levels=[0.5],
                    colors="white",
                    linewidths=0.5,
                )
            ax.set_title(f"axial z={oz + k * sz:.0f} mm", color="white", fontsize=9)
            ax.text(0.02, 0.04, "R", color="yellow", transform=ax.transAxes, fontsize=10)
            ax.text(0.95, 0.04, "L", color="yellow", transform=ax.transAxes, fontsize=10)
        ax = axes[row, 2]
        j = int(np.clip(round((10.0 - oy) / sy), 0, ny - 1))  # coronal plane through the kidneys
        extent = (ox - sx / 2, ox + (nx - 0.5) * sx, oz - sz / 2, oz + (nz - 0.5) * sz)
        ax.imshow(
            arr[:, j, :],
            cmap="gray",
            vmin=-160,
            vmax=240,
            extent=extent,
            origin="lower",
            interpolation="bilinear",
            aspect="equal",
        )
        ax.imshow(
            larr[:, j, :],
            cmap=cmap,
            vmin=0,
            vmax=7,
            extent=extent,
            origin="lower",
            interpolation="nearest",
            aspect="equal",
        )
        ax.set_title(f"coronal y={oy + j * sy:.0f} mm", color="white", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].annotate(
            title, (0.0, 1.13), xycoords="axes fraction", color="white", fontsize=11, fontweight="bold"
        )
    handles = [plt.Rectangle((0, 0), 1, 1, color=o.colour_float) for o in ORGANS]
    fig.legend(
        handles,
        [o.name for o in ORGANS],
        loc="lower center",
        ncol=4,
        facecolor="black",
        labelcolor="white",
        frameon=False,
    )
    fig.suptitle(
        "SegViz phantom sites · W400 L40 · radiological convention (patient right on image left)",
        color="white",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.98))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path
