"""Tests of the synthetic CT phantom: determinism, HU per tissue and phase, volumes, anatomy, site layout."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SegVizLogic.errors import SegVizInputError
from SegVizLogic.phantom import (
    TISSUES,
    PhantomLayout,
    ScannerProfile,
    generate_phantom_sites,
    make_phantom_case,
    phantom_populations,
    phantom_scanners,
    sample_anatomy,
)

SCANNERS = phantom_scanners("small")
PV = SCANNERS["site-liver"]
NC = SCANNERS["site-spleen"]
ORGAN_LABELS = {"liver": 1, "spleen": 2, "pancreas": 3, "kidney": 4}

# name, lo, hi: interior (1-voxel eroded) mean HU of each organ in the portal-venous phase
TEST_CASE_PV = [("liver", 100, 130), ("spleen", 110, 130), ("pancreas", 80, 110)]
# name, expected non-contrast value, tolerance
TEST_CASE_NC = [("liver", 55, 12), ("spleen", 45, 12), ("pancreas", 40, 12), ("kidney", 30, 12)]
# name, lo, hi in mL
TEST_CASE_VOLUME = [("liver", 1200, 1800), ("spleen", 150, 300), ("pancreas", 60, 100)]


def _arrays(images):
    return [sitk.GetArrayFromImage(im) for im in images]


def _interior_mean(ct: np.ndarray, mask: np.ndarray) -> float:
    return float(ct[ndimage.binary_erosion(mask)].mean())


def _centroid_lps(labels: sitk.Image, value: int) -> np.ndarray:
    """Physical (LPS) centroid of one label value, whatever the image's direction."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(labels) == value)[:, ::-1].astype(float)  # (x, y, z) index
    mean_index = idx.mean(axis=0)
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(mean_index.tolist()))


@pytest.fixture(scope="module")
def pv_cases():
    return [make_phantom_case(seed, PV, return_tissues=True) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> PhantomLayout:
    return generate_phantom_sites(
        tmp_path_factory.mktemp("phantom") / "sites", seed=3, cases_per_site=2, external_cases=2
    )


def test_same_seed_identical_other_seed_differs():
    a = _arrays(make_phantom_case(5, SCANNERS["site-kidney"]))
    b = _arrays(make_phantom_case(5, SCANNERS["site-kidney"]))
    c = _arrays(make_phantom_case(6, SCANNERS["site-kidney"]))
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])  # different anatomy, not only different noise


def test_types_and_size_budget():
    for scanner in SCANNERS.values():
        nx, ny, nz = scanner.grid_size
        assert nx * ny * nz <= 1_000_000, scanner.name
        assert 2.5 <= scanner.pixel_spacing <= 4.0 and 3.0 <= scanner.slice_thickness <= 5.0
    ct, labels = make_phantom_case(0, PV)
    assert ct.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1, 2, 3, 4}
    full = phantom_scanners("full")
    assert all(s.grid_size[:2] == (512, 512) and 0.7 <= s.pixel_spacing <= 0.9 for s in full.values())


@pytest.mark.parametrize("organ,lo,hi", TEST_CASE_PV)
def test_portal_venous_organ_hu(pv_cases, organ, lo, hi):
    for ct, labels, _ in pv_cases:
        ct, labels = _arrays((ct, labels))
        assert lo <= _interior_mean(ct, labels == ORGAN_LABELS[organ]) <= hi


def test_kidney_cortex_and_medulla(pv_cases):
    for ct, _, tissues in pv_cases:
        ct, tissues = _arrays((ct, tissues))
        cortex = ct[tissues == TISSUES["kidney_cortex"]].mean()
        medulla = ct[tissues == TISSUES["kidney_medulla"]].mean()
        assert 150 <= cortex <= 200 and medulla < cortex - 25


@pytest.mark.parametrize("organ,expected,tol", TEST_CASE_NC)
def test_non_contrast_is_lower(organ, expected, tol):
    assert NC.phase == "non-contrast"
    for seed in (0, 1):
        anatomy = sample_anatomy(seed)
        nc_ct, nc_lab = _arrays(make_phantom_case(seed, NC, anatomy=anatomy))
        pv_ct, pv_lab = _arrays(make_phantom_case(seed, PV, anatomy=anatomy))
        value = ORGAN_LABELS[organ]
        nc, pv = _interior_mean(nc_ct, nc_lab == value), _interior_mean(pv_ct, pv_lab == value)
        assert abs(nc - expected) <= tol
        if organ != "kidney":  # the kidney cortex enhances by > 120 HU, as it does in patients
            assert 20 <= pv - nc <= 80


def test_tissue_hu(pv_cases):
    for ct, _, tissues in pv_cases:
        ct, tissues = _arrays((ct, tissues))

        def mean(*names: str, erode: bool = True, ct=ct, tissues=tissues) -> float:
            mask = np.isin(tissues, [TISSUES[n] for n in names])
            return float(ct[ndimage.binary_erosion(mask) if erode else mask].mean())

        assert abs(mean("air") + 1000) <= 15
        assert -120 <= mean("fat") <= -80 and -120 <= mean("visceral_fat") <= -80
        assert 20 <= mean("muscle") <= 60
        assert 300 <= mean("bone_cortical", "bone_cancellous", erode=False) <= 1000
        assert mean("bone_cortical", erode=False) > mean("bone_cancellous", erode=False) + 200
        assert (tissues == TISSUES["gas"]).sum() > 0 and mean("gas", erode=False) < -850  # bowel gas
        assert (tissues == TISSUES["lung"]).any()


def test_contrast_in_vessels():
    anatomy = sample_anatomy(4)
    means = {}
    for scanner in (PV, NC, SCANNERS["site-kidney"]):
        ct, _, tissues = _arrays(make_phantom_case(4, scanner, anatomy=anatomy, return_tissues=True))
        means[scanner.phase] = ct[ndimage.binary_erosion(tissues == TISSUES["aorta"])].mean()
    assert means["arterial"] > 250 > means["portal-venous"] > 130
    assert means["non-contrast"] < 60


def test_organ_volumes():
    for seed in range(4):
        _, labels = make_phantom_case(seed, SCANNERS["site-pancreas"])
        voxel_ml = np.prod(labels.GetSpacing()) / 1000.0
        arr = sitk.GetArrayFromImage(labels)
        for organ, lo, hi in TEST_CASE_VOLUME:
            assert lo <= (arr == ORGAN_LABELS[organ]).sum() * voxel_ml <= hi, (seed, organ)
        kidneys, n = ndimage.label(arr == 4)
        sizes = np.bincount(kidneys.ravel())[1:] * voxel_ml
        big = np.sort(sizes)[-2:]
        assert n >= 2 and all(120 <= s <= 200 for s in big), (seed, sizes)


@pytest.mark.parametrize("site", list(SCANNERS))
def test_anatomy_in_physical_space(site):
    """Liver right, spleen left and posterior, pancreas midline and anterior; for every orientation."""
    _, labels = make_phantom_case(11, SCANNERS[site])
    liver, spleen, pancreas = (_centroid_lps(labels, v) for v in (1, 2, 3))
    kidneys, n = ndimage.label(sitk.GetArrayFromImage(labels) == 4)
    assert n >= 2
    # LPS: +x is the patient's left, +y posterior, +z superior.
    assert liver[0] < -30 and spleen[0] > 40
    assert spleen[1] > liver[1] + 10
    assert abs(pancreas[0]) < 0.6 * abs(liver[0])
    kid = []
    for k in (1, 2):
        one = sitk.GetImageFromArray((kidneys == k).astype(np.uint8))
        one.CopyInformation(labels)
        kid.append(_centroid_lps(one, 1))
    kid.sort(key=lambda c: c[0])
    spine_y = 8.0  # vertebral body centre in the phantom's patient frame
    assert kid[0][0] < -40 and kid[1][0] > 40
    assert kid[0][1] > pancreas[1] + 30 and kid[1][1] > pancreas[1] + 30  # kidneys posterior
    assert pancreas[1] < spine_y - 20  # pancreas anterior to the spine
    assert liver[2] > kid[0][2]  # liver higher than the right kidney


def test_site_layout(layout):
    root = layout.root
    assert [p.name for p in layout.sites] == ["site-liver", "site-spleen", "site-pancreas", "site-kidney"]
    assert layout.external == root / "external"
    formats, directions = set(), set()
    for folder, organ in zip(layout.sites, ["liver", "spleen", "pancreas", "kidney"]):
        info = json.loads((folder / "site.json").read_text(encoding="utf-8"))
        assert info == {"name": folder.name, "organs": [organ], "labels": {"1": organ}}
        images = sorted(p.name for p in (folder / "images").iterdir())
        assert images == sorted(p.name for p in (folder / "labels").iterdir()) and len(images) == 2
        ext = images[0][len("case000") :]
        formats.add(ext)
        ct = sitk.ReadImage(str(folder / "images" / images[0]))
        lab = sitk.ReadImage(str(folder / "labels" / images[0]))
        directions.add(tuple(np.round(ct.GetDirection(), 3)))
        assert np.allclose(ct.GetDirection(), lab.GetDirection()) and ct.GetSize() == lab.GetSize()
        assert set(np.unique(sitk.GetArrayViewFromImage(lab))) == {0, 1}
        centroid = _centroid_lps(lab, 1)
        if organ == "liver":
            assert centroid[0] < -30  # patient's right, read back from disk
        if organ == "spleen":
            assert centroid[0] > 40
    info = json.loads((layout.external / "site.json").read_text(encoding="utf-8"))
    assert info == {
        "name": "external",
        "organs": ["liver", "spleen", "pancreas", "kidney"],
        "labels": {"1": "liver", "2": "spleen", "3": "pancreas", "4": "kidney"},
    }
    ext_lab = sitk.ReadImage(str(min((layout.external / "labels").iterdir())))
    assert set(np.unique(sitk.GetArrayViewFromImage(ext_lab))) == {0, 1, 2, 3, 4}
    directions.add(tuple(np.round(ext_lab.GetDirection(), 3)))
    assert formats == {".nii.gz", ".nrrd", ".mha"}
    assert len(directions) == 5  # LPS, RAS, LAS, PIR, RAI
    manifest = json.loads((root / "phantom.json").read_text(encoding="utf-8"))
    assert manifest["sites"]["site-spleen"]["scanner"]["phase"] == "non-contrast"
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(SegVizInputError, match="not empty"):
        generate_phantom_sites(out, cases_per_site=1, external_cases=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    layout = generate_phantom_sites(out, cases_per_site=1, external_cases=1, force=True)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine" and layout.external.is_dir()
    with pytest.raises(ValueError):
        generate_phantom_sites(tmp_path / "x", layout="pooled")


def test_scanner_profile_validation():
    with pytest.raises(ValueError, match="phase"):
        ScannerProfile(phase="delayed")
    with pytest.raises(ValueError, match="orientation"):
        ScannerProfile(orientation="RRS")
    with pytest.raises(ValueError, match="file_format"):
        ScannerProfile(file_format=".dcm")


POPULATIONS = phantom_populations()


def _tissue_share(population, tissue: str, seeds=(0, 1, 2)) -> float:
    shares = []
    for seed in seeds:
        _, _, tissues = make_phantom_case(seed, PV, population=population, return_tissues=True)
        arr = sitk.GetArrayViewFromImage(tissues)
        shares.append((arr == TISSUES[tissue]).sum() / (arr != TISSUES["air"]).sum())
    return float(np.mean(shares))


def test_sites_scan_different_populations():
    heavier, slimmer = POPULATIONS["site-spleen"], POPULATIONS["site-pancreas"]
    assert heavier.fat > 1.2 and slimmer.fat < 0.8
    # the same patients (seeds) drawn from the heavier population carry far more subcutaneous fat
    assert _tissue_share(heavier, "fat") > 1.3 * _tissue_share(slimmer, "fat")
    # bolus timing varies between patients: the portal-venous liver of ten patients spans > 10 HU
    livers = []
    for seed in range(10):
        ct, labels = _arrays(make_phantom_case(seed, PV, population=POPULATIONS["site-kidney"]))
        livers.append(_interior_mean(ct, labels == 1))
    assert np.ptp(livers) > 10


def test_fields_of_view_and_scan_ranges_differ_between_sites(layout):
    def z_range(image):
        image = sitk.DICOMOrient(image, "LPS")
        return image.GetOrigin()[2], image.GetOrigin()[2] + (image.GetSize()[2] - 1) * image.GetSpacing()[2]

    anatomy = sample_anatomy(5)
    imaged = {name: make_phantom_case(5, SCANNERS[name], anatomy=anatomy)[1] for name in SCANNERS}
    ml = {
        name: (sitk.GetArrayViewFromImage(lab) == 1).sum() * np.prod(lab.GetSpacing()) / 1000
        for name, lab in imaged.items()
    }
    # the same patient's liver: whole in site-liver's field, its dome cut off by site-pancreas's short one
    assert ml["site-pancreas"] < 0.95 * ml["site-liver"]
    # site-spleen scans higher up the body than site-kidney (scan centres 118 mm and 92 mm)
    spleen_z, kidney_z = z_range(imaged["site-spleen"]), z_range(imaged["site-kidney"])
    assert spleen_z[1] > kidney_z[1] + 10 and spleen_z[0] > kidney_z[0] + 10
    # and each patient lies a little differently in the scanner: the two cases' origins differ
    folder = layout.root / "site-liver"
    origins = [sitk.ReadImage(str(p)).GetOrigin() for p in sorted((folder / "images").iterdir())]
    assert not np.allclose(origins[0], origins[1], atol=1.0)


def test_the_external_scanner_is_none_of_the_sites():
    scanners = phantom_scanners("small")
    external = scanners["external"]
    keys = ("noise_sigma", "noise_grain", "intensity_offset", "cupping", "pixel_spacing", "orientation")
    for name, scanner in scanners.items():
        if name != "external":
            assert all(getattr(scanner, k) != getattr(external, k) for k in keys), name
    # cupping: the body's centre reads lower than its edge by about the scanner's cupping, air not at all
    anatomy = sample_anatomy(2)
    plain = make_phantom_case(2, replace(PV, noise_sigma=0.0), anatomy=anatomy, return_tissues=True)
    cupped = make_phantom_case(2, replace(PV, noise_sigma=0.0, cupping=30.0), anatomy=anatomy)
    ct0, ct1, tissues = _arrays((plain[0], cupped[0], plain[2]))
    difference = ct0.astype(float) - ct1.astype(float)
    assert np.all(difference[tissues == TISSUES["air"]] == 0)
    nz, ny, nx = difference.shape
    centre = difference[nz // 2, ny // 2 - 5 : ny // 2 + 5, nx // 2 - 5 : nx // 2 + 5]
    assert 25 <= float(np.median(centre)) <= 31


def test_more_cases_per_site_keep_the_first_ones(layout, tmp_path):
    """Nested training sets for a learning curve: case k depends only on the seed, site and k."""
    fewer = generate_phantom_sites(tmp_path / "one", seed=3, cases_per_site=1, external_cases=1)
    for small, large in ((fewer.sites[2], layout.sites[2]), (fewer.external, layout.external)):
        name = min((small / "images").iterdir()).name
        for kind in ("images", "labels"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(small / kind / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(large / kind / name)))
            assert a.tobytes() == b.tobytes()
