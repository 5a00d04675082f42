"""Keys and certificates of a SegViz federation: a private CA and the SuperLink's certificate,
the federation's Ed25519 signing key with the sites' trust file, and SuperNode authentication
key pairs (docs/SECURITY.md says who holds which)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import SegVizInputError
from ..output_paths import check_output_folder
from ..signing import FEDERATION_KEY_FILE, TRUST_FILE, write_signing_key

__all__ = ["CERT_FILES", "SITE_FILES", "write_certificates", "write_node_key_pair"]

CERT_FILES = ("ca.crt", "server.crt", "server.key")
SITE_FILES = ("ca.crt", TRUST_FILE)
"""What every site receives from the coordinator; everything else in the folder stays with it."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SegViz federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_certificates(
    out_dir: str | Path, hosts: Sequence[str] = (), days: int = 365, force: bool = False
) -> dict[str, Path]:
    """Write the federation's files: ``ca.crt``, ``server.crt``, ``server.key`` for the SuperLink,
    and ``federation.key`` with ``federation-trust.yaml`` (:func:`~SegVizLogic.signing.write_signing_key`).

    The server certificate names ``localhost``, ``127.0.0.1`` and every host in ``hosts``
    (DNS names or IP addresses the sites use to reach the coordinator). Sites get ``ca.crt``
    and ``federation-trust.yaml`` (:data:`SITE_FILES`); ``server.key`` and ``federation.key``
    stay on the coordinator (mode 0600). The CA's private key is not kept: to add a host,
    write new certificates with ``force`` and hand out the new ``ca.crt`` (the signing key is
    kept, so bundles signed before stay verifiable).

    Args:
        out_dir: folder to write into (created).
        hosts: extra names / IP addresses of the coordinator.
        days: validity.
        force: replace existing files.

    Returns:
        The paths by file name (``ca.crt``, ``server.crt``, ``server.key``, ``federation.key``,
        ``federation-trust.yaml``).

    Raises:
        SegVizInputError: the files exist and ``force`` is false.
    """
    out = check_output_folder(out_dir)  # a file in the way is one line, not a traceback
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in CERT_FILES}
    existing = [str(p) for p in [*paths.values(), out / TRUST_FILE] if p.exists()]
    if existing and not force:
        raise SegVizInputError(existing[0], "already exists; use --force to replace the federation's certificates")
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("SegViz federation CA"))
        .issuer_name(_name("SegViz federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("SegViz SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["server.crt"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        paths["server.key"],
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    paths[FEDERATION_KEY_FILE], paths[TRUST_FILE] = write_signing_key(out, force=True)
    return paths


def write_node_key_pair(out_dir: str | Path, name: str = "node", force: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair: ``<name>.key`` (private, stays on site) and
    ``<name>.pub`` (OpenSSH public key, registered at the SuperLink by the coordinator).

    Raises:
        SegVizInputError: the key exists and ``force`` is false.
    """
    out = check_output_folder(out_dir)  # a file in the way is one line, not a traceback
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{name}.key", out / f"{name}.pub"
    if private.exists() and not force:
        raise SegVizInputError(private, "already exists; use --force to replace this site's key")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public
