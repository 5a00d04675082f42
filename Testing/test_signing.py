"""Signed model bundles and the federation's key: what verification says for a bundle signed by the
federation, by another key, unsigned, and changed after signing (including a re-zip with recomputed
checksums, which anyone can make); the CLI's report; and that Flower itself accepts our trust
file and our FAB signatures."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegVizLogic.bundle import load_bundle, save_bundle
from SegVizLogic.errors import BundleError, SegVizInputError
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.preprocessing import Preprocessing
from SegVizLogic.signing import (
    SIGNATURE_MEMBER,
    TRUST_FILE,
    load_signing_key,
    read_trust_file,
    sign_bundle,
    verify_bundle,
    write_signing_key,
)

TINY = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=0, body_features=4)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The federation's key and another party's key, each with its trust file."""
    root = tmp_path_factory.mktemp("keys")
    federation = write_signing_key(root / "federation")
    other = write_signing_key(root / "other")
    return {"federation": federation, "other": other}


@pytest.fixture
def bundle(tmp_path) -> Path:
    return save_bundle(tmp_path / "model.segviz", build_network(TINY), Preprocessing(spacing=(6.0, 6.0, 6.0)))


def _rezip(source: Path, target: Path, replace: dict[str, bytes], drop=(), recompute_checksums=True) -> Path:
    """What an attacker with the bundle can do: change members, recompute the manifest's checksums."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name not in drop}
    members.update(replace)
    if recompute_checksums:
        manifest = json.loads(members["manifest.json"])
        manifest["sha256"] = {
            name: hashlib.sha256(data).hexdigest()
            for name, data in members.items()
            if name not in ("manifest.json", SIGNATURE_MEMBER)
        }
        members["manifest.json"] = json.dumps(manifest, indent=2).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def _other_weights(path: Path) -> bytes:
    import io

    with zipfile.ZipFile(path) as archive, np.load(io.BytesIO(archive.read("weights.npz"))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    first = min(k for k in arrays if arrays[k].dtype.kind == "f")
    arrays[first] = arrays[first] + 0.5  # a backdoored model looks like this: same shapes, other numbers
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_signing_key_files(tmp_path, keys):
    key_path, trust_path = keys["federation"]
    assert key_path.name == "federation.key" and trust_path.name == TRUST_FILE
    assert key_path.stat().st_mode & 0o777 == 0o600
    trusted = read_trust_file(trust_path)
    (key_id,) = trusted
    assert key_id.startswith("fpk_")
    assert trusted[key_id].public_bytes_raw() == load_signing_key(key_path).public_key().public_bytes_raw()
    with pytest.raises(SegVizInputError, match="already exists"):
        write_signing_key(key_path.parent)
    # --force rewrites the trust file but never rotates the key: signed bundles stay verifiable.
    write_signing_key(key_path.parent, force=True)
    assert list(read_trust_file(trust_path)) == [key_id]
    (tmp_path / "bad.yaml").write_text("fpk_x: ssh-rsa AAAAB3NzaC1yc2E\n", encoding="utf-8")
    with pytest.raises(SegVizInputError, match="bad.yaml: entry 'fpk_x'"):
        read_trust_file(tmp_path / "bad.yaml")
    with pytest.raises(SegVizInputError, match="signing key not found"):
        load_signing_key(tmp_path / "none.key")


def test_flower_accepts_our_trust_file(keys):
    """The SuperNode's own parser and key check (flwr/supernode/cli/flower_supernode.py)."""
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    entities = _try_obtain_trusted_entities(keys["federation"][1])
    _validate_public_keys_ed25519(entities)  # exits the process if a key is not Ed25519
    assert list(entities) == list(read_trust_file(keys["federation"][1]))


def test_flower_verifies_our_fab_signature(keys, tmp_path):
    """A FAB signed by `segviz federation run` passes the SuperNode's own check with the
    federation's trust file and fails it with another federation's."""
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities
    from flwr.supernode.start_client_internal import _verify_fab

    from SegVizLogic.federated.app_registry import build_app_fab, sign_fab

    fab = build_app_fab(tmp_path)
    verification = sign_fab(fab, keys["federation"][0])
    stored = Fab(hashlib.sha256(fab).hexdigest(), fab, _format_verification([verification]))
    assert _verify_fab(stored, _try_obtain_trusted_entities(keys["federation"][1]))
    assert not _verify_fab(stored, _try_obtain_trusted_entities(keys["other"][1]))
    other_content = fab + b"\0"  # any other bytes under the same signature
    assert not _verify_fab(
        Fab(hashlib.sha256(other_content).hexdigest(), other_content, stored.verifications),
        _try_obtain_trusted_entities(keys["federation"][1]),
    )


def test_app_registry_answers_flowers_fetch_fab(keys, tmp_path):
    """The SuperLink's own client code (flwr/supercore/utils.py request_download_link) against the registry."""
    import requests
    from flwr.supercore.utils import request_download_link

    from SegVizLogic.federated.app_registry import APP_ID, AppRegistry, build_app_fab, registry_url, sign_fab
    from SegVizLogic.federated.processes import free_port

    fab = build_app_fab(tmp_path)
    verification = sign_fab(fab, keys["federation"][0])
    port = free_port()
    with AppRegistry(fab, verification, port):
        url, verifications, _ = request_download_link(APP_ID, "0.1.0", f"{registry_url(port)}/hub/fetch-fab", "fab_url")
        assert verifications == [verification]
        assert requests.get(url, timeout=10).content == fab
        with pytest.raises(ValueError, match="Available app versions for @segviz/segviz: 0.1.0"):
            request_download_link(APP_ID, "9.9.9", f"{registry_url(port)}/hub/fetch-fab", "fab_url")
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@someone/rogue", "0.1.0", f"{registry_url(port)}/hub/fetch-fab", "fab_url")
    with pytest.raises(requests.ConnectionError):  # it exists only while a run is submitted
        requests.get(url, timeout=5)


def test_signed_unsigned_foreign_and_tampered_bundles(bundle, keys, tmp_path):
    trusted = read_trust_file(keys["federation"][1])
    assert verify_bundle(bundle, trusted).status == "unsigned"

    sign_bundle(bundle, keys["federation"][0])
    result = verify_bundle(bundle, trusted)
    assert result.status == "federation" and result.trusted and result.key_id == next(iter(trusted))
    assert "signed by the federation key" in result.message
    assert verify_bundle(bundle).status == "unknown-key"  # no trust file: valid, but whose?
    assert verify_bundle(bundle, read_trust_file(keys["other"][1])).status == "unknown-key"
    load_bundle(bundle)  # the signature member does not disturb loading
    with pytest.raises(BundleError, match="already signed"):
        sign_bundle(bundle, keys["federation"][0])

    # Weights replaced, checksums recomputed, the old signature kept: the manifest changed.
    kept = _rezip(bundle, tmp_path / "kept.segviz", {"weights.npz": _other_weights(bundle)})
    load_bundle(kept)  # the checksums alone are consistent...
    assert verify_bundle(kept, trusted).status == "tampered"  # ...the signature is not
    # The same without the signature: unsigned, never "signed".
    dropped = _rezip(
        bundle, tmp_path / "dropped.segviz", {"weights.npz": _other_weights(bundle)}, drop=[SIGNATURE_MEMBER]
    )
    assert verify_bundle(dropped, trusted).status == "unsigned"
    # Re-signed with another key: valid signature, but not the federation's.
    resigned = sign_bundle(
        _rezip(dropped, tmp_path / "resigned.segviz", {}, recompute_checksums=False), keys["other"][0]
    )
    assert verify_bundle(resigned, trusted).status == "unknown-key"
    # Weights replaced without touching the manifest: the checksum names the member.
    swapped = _rezip(
        bundle, tmp_path / "swapped.segviz", {"weights.npz": _other_weights(bundle)}, recompute_checksums=False
    )
    result = verify_bundle(swapped, trusted)
    assert result.status == "tampered" and "weights.npz changed after signing" in result.message
    # A member the signed manifest does not list.
    extra = _rezip(bundle, tmp_path / "extra.segviz", {"batchnorm/averaged.npz": b"x"}, recompute_checksums=False)
    assert verify_bundle(extra, trusted).status == "tampered"
    # A second weights.npz appended (zip readers take the last one).
    appended = tmp_path / "appended.segviz"
    appended.write_bytes(bundle.read_bytes())
    with zipfile.ZipFile(appended, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("weights.npz", _other_weights(bundle))
    assert verify_bundle(appended, trusted).status == "tampered"
    # A signature record that claims the federation's key id for another key.
    forged = json.loads(zipfile.ZipFile(resigned).read(SIGNATURE_MEMBER))
    forged["key_id"] = next(iter(trusted))
    claimed = _rezip(
        resigned,
        tmp_path / "claimed.segviz",
        {SIGNATURE_MEMBER: json.dumps(forged).encode()},
        recompute_checksums=False,
    )
    assert verify_bundle(claimed, trusted).status == "tampered"
    with pytest.raises(BundleError, match="not a readable"):
        verify_bundle(tmp_path / "missing.segviz")


def _segviz(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "SegVizLogic.cli", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_model_info_and_infer_report_the_signature(bundle, keys, tmp_path):
    trust = str(keys["federation"][1])
    done = _segviz("model-info", str(bundle), "--json", "--trust", trust)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["signature"]["status"] == "unsigned"

    sign_bundle(bundle, keys["federation"][0])
    done = _segviz("model-info", str(bundle), env={"SEGVIZ_TRUST": trust})  # the default trust location
    assert done.returncode == 0 and "signed by the federation key fpk_" in done.stdout, done.stdout + done.stderr

    # A CT-like volume (a constant image is refused as "not a CT" before anything else).
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (12, 24, 24)).astype(np.int16))
    image.SetSpacing((6.0, 6.0, 6.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    done = _segviz(
        "infer", "--model", str(bundle), "--input", str(tmp_path / "ct.nii.gz"), "--output", str(tmp_path / "a.nii.gz"),
        "--device", "cpu", "--progress", "json", "--trust", trust,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stages = [json.loads(line) for line in done.stdout.splitlines() if '"signature"' in line]
    assert stages and stages[0]["signature"]["status"] == "federation"

    tampered = _rezip(bundle, tmp_path / "tampered.segviz", {"weights.npz": _other_weights(bundle)})
    done = _segviz("model-info", str(tampered), "--json", "--trust", trust)
    assert json.loads(done.stdout)["signature"]["status"] == "tampered"
    done = _segviz(
        "infer", "--model", str(tampered), "--input", str(tmp_path / "ct.nii.gz"), "--output", str(tmp_path / "b.nii.gz"),
        "--device", "cpu", "--trust", trust,
    )  # fmt: skip
    assert done.returncode == 2 and "TAMPERED" in done.stderr and not (tmp_path / "b.nii.gz").exists()
