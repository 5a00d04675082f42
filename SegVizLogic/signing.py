"""The federation's Ed25519 signing key, its trust file, and signed model bundles.

One key pair signs everything a site must be able to trust from its coordinator:

- the SegViz Flower app (FAB) that ``segviz federation run`` submits: the SuperNode of every
  site refuses a FAB that this key did not sign (Flower's ``--trusted-entities``, see
  :mod:`SegVizLogic.federated.app_registry`);
- every model bundle the coordinator's ServerApp writes (:func:`sign_bundle`), so ``infer``,
  ``model-info`` and the Slicer module can say whether a bundle came from the federation.

Files (written by ``segviz federation certs``):

- ``federation.key``: the private key (OpenSSH format, mode 0600). It stays with the coordinator.
- ``federation-trust.yaml``: the public key in the trusted-entities format Flower's SuperNode
  reads (``fpk_<id>: "ssh-ed25519 AAAA... segviz-federation"``). Sites receive it with ``ca.crt``.

A bundle signature is the member ``signature.json`` of the bundle's zip: an Ed25519 signature
over the bytes of ``manifest.json``. The manifest lists the SHA-256 of every other member, so
the signature plus those checksums cover the whole bundle. A checksum alone proves nothing
(anyone can recompute it); only the signature ties the bundle to the key.

This module imports neither torch nor Flower: the Slicer panel calls :func:`verify_bundle`
directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import BundleError, SegVizInputError

__all__ = [
    "FEDERATION_KEY_FILE",
    "SIGNATURE_MEMBER",
    "SIGNATURE_STATUSES",
    "TRUST_FILE",
    "TRUST_FILE_ENV",
    "BundleSignature",
    "bundle_signature",
    "default_trust_file",
    "load_signing_key",
    "public_key_id",
    "read_trust_file",
    "resolve_trust_file",
    "sign_bundle",
    "verify_bundle",
    "write_signing_key",
]

FEDERATION_KEY_FILE = "federation.key"
TRUST_FILE = "federation-trust.yaml"
TRUST_FILE_ENV = "SEGVIZ_TRUST"
SIGNATURE_MEMBER = "signature.json"
_MANIFEST_MEMBER = "manifest.json"  # bundle_manifest.MANIFEST_MEMBER; not imported to keep this module minimal
_KEY_COMMENT = "segviz-federation"
# Domain separation: a bundle signature can never be mistaken for a FAB signature made with the
# same key (Flower signs 8 timestamp bytes + a 32-byte digest; ours starts with this text).
_BUNDLE_DOMAIN = b"SegViz model bundle signature v1\x00"
_CHUNK = 1 << 20

SIGNATURE_STATUSES = ("federation", "unknown-key", "unsigned", "tampered")
"""What :func:`verify_bundle` can say: signed by a trusted (federation) key, validly signed by a
key not in the trust file, not signed, or signed but changed since (or malformed)."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _openssh_public(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_id(key: ed25519.Ed25519PublicKey) -> str:
    """The key's id in trust files and signatures: ``fpk_`` and a UUID derived from the key.

    Flower's trusted-entities files name keys ``fpk_<UUID>``; deriving the UUID from the key
    bytes makes the id the same wherever the key is seen.
    """
    return f"fpk_{uuid.UUID(bytes=hashlib.sha256(_raw(key)).digest()[:16])}"


def write_signing_key(out_dir: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write the federation's signing key pair: ``federation.key`` (private, 0600) and
    ``federation-trust.yaml`` (the public key, for the sites).

    An existing ``federation.key`` is kept, even with ``force``: replacing it would make every
    bundle signed so far "signed by an unknown key" and every site's trust file stale. To
    rotate it, delete it first. The trust file is rewritten from the key.

    Returns:
        ``(federation.key, federation-trust.yaml)``.

    Raises:
        SegVizInputError: the trust file exists without ``force``, or ``federation.key`` is not
            an Ed25519 key.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, trust_path = out / FEDERATION_KEY_FILE, out / TRUST_FILE
    if trust_path.exists() and not force:
        raise SegVizInputError(trust_path, "already exists; use --force to replace the federation's files")
    if key_path.exists():
        key = load_signing_key(key_path)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
    public = key.public_key()
    trust_path.write_text(
        "# SegViz federation: the public key of the coordinator's signing key.\n"
        "# Sites: segviz federation join --trust federation-trust.yaml (Flower's --trusted-entities format)\n"
        f'{public_key_id(public)}: "{_openssh_public(public)} {_KEY_COMMENT}"\n',
        encoding="utf-8",
    )
    return key_path, trust_path


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """The federation's private key from ``federation.key``.

    Raises:
        SegVizInputError: missing, unreadable, or not an unencrypted Ed25519 OpenSSH/PEM key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SegVizInputError(
            path, "signing key not found (it is federation.key from `segviz federation certs`)"
        ) from None
    except OSError as error:
        raise SegVizInputError(path, f"signing key unreadable ({error.strerror})") from None
    try:
        key = (
            serialization.load_ssh_private_key(data, None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, None)
        )
    except (ValueError, TypeError) as error:
        raise SegVizInputError(path, f"is not a usable signing key ({error})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SegVizInputError(path, "is not an Ed25519 key (use federation.key from `segviz federation certs`)")
    return key


def read_trust_file(path: str | Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """The trusted keys of a trusted-entities YAML file (``federation-trust.yaml``).

    Raises:
        SegVizInputError: missing, not YAML, not a mapping of ids to ``ssh-ed25519`` keys.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegVizInputError(
            path, "trust file not found (federation-trust.yaml comes from the coordinator's `segviz federation certs`)"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SegVizInputError(path, f"is not a readable trust file ({type(error).__name__})") from None
    if not isinstance(data, dict) or not data:
        raise SegVizInputError(path, 'is not a trust file: expected lines like fpk_<id>: "ssh-ed25519 AAAA..."')
    keys = {}
    for key_id, text in data.items():
        try:
            key = serialization.load_ssh_public_key(str(text).encode("utf-8"))
        except (ValueError, TypeError, UnicodeError):
            raise SegVizInputError(path, f"entry {key_id!r} is not an OpenSSH public key") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SegVizInputError(path, f"entry {key_id!r} is not an Ed25519 key (Flower accepts only Ed25519)")
        keys[str(key_id)] = key
    return keys


def default_trust_file() -> Path | None:
    """Where ``infer``/``model-info`` look for the federation's trust file without ``--trust``:
    ``$SEGVIZ_TRUST``, else ``~/.segviz/federation-trust.yaml``; ``None`` when neither exists."""
    env = os.environ.get(TRUST_FILE_ENV)
    if env:
        return Path(env)
    candidate = Path.home() / ".segviz" / TRUST_FILE
    return candidate if candidate.is_file() else None


def resolve_trust_file(given: str | Path | None) -> dict[str, ed25519.Ed25519PublicKey] | None:
    """The trusted keys from ``given`` or :func:`default_trust_file`; ``None`` when there is none."""
    path = Path(given) if given is not None else default_trust_file()
    return None if path is None else read_trust_file(path)


def _bundle_message(manifest: bytes, signed_at: str) -> bytes:
    return _BUNDLE_DOMAIN + signed_at.encode("ascii") + b"\x00" + hashlib.sha256(manifest).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_bundle(path: str | Path, key: ed25519.Ed25519PrivateKey | str | Path) -> Path:
    """Sign the bundle at ``path`` in place: add ``signature.json`` over its manifest.

    Call it before the bundle becomes visible under its final name (the ServerApp signs a
    temporary file, then renames it). A signature already in the bundle is an error: a
    bundle is signed once, by the coordinator that wrote it.

    Args:
        path: a ``*.segviz`` bundle.
        key: the private key, or the path of ``federation.key``.

    Raises:
        BundleError: not a bundle, or already signed.
    """
    path = Path(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        key = load_signing_key(key)
    try:
        with zipfile.ZipFile(path, "a") as archive:
            names = archive.namelist()
            if SIGNATURE_MEMBER in names:
                raise BundleError(path, "is already signed")
            if _MANIFEST_MEMBER not in names:
                raise BundleError(path, "is not a SegViz model bundle (no manifest.json)")
            manifest = archive.read(_MANIFEST_MEMBER)
            public = key.public_key()
            signed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record = {
                "format": "segviz-signature",
                "version": 1,
                "algorithm": "ed25519",
                "signed": _MANIFEST_MEMBER,
                "key_id": public_key_id(public),
                "public_key": _openssh_public(public),
                "signed_at": signed_at,
                "signature": _b64(key.sign(_bundle_message(manifest, signed_at))),
            }
            archive.writestr(SIGNATURE_MEMBER, json.dumps(record, indent=2))
    except (zipfile.BadZipFile, OSError) as error:
        raise BundleError(path, f"cannot be signed: not a readable bundle ({error})") from None
    return path


@dataclass(frozen=True)
class BundleSignature:
    """Whether a bundle is signed, and by whom.

    Attributes:
        status: one of :data:`SIGNATURE_STATUSES`.
        message: one line for people (``signed by the federation key fpk_...``).
        key_id: the signing key's id (``None`` when unsigned).
        signed_at: when it was signed (ISO 8601, UTC), as the signature states.
    """

    status: str
    message: str
    key_id: str | None = None
    signed_at: str | None = None

    @property
    def trusted(self) -> bool:
        """Signed by a key of the trust file, and unchanged since."""
        return self.status == "federation"

    def to_dict(self) -> dict:
        """For ``--json`` output and progress events."""
        return asdict(self)


def _member_sha256(archive: zipfile.ZipFile, name: str) -> str:
    digest = hashlib.sha256()
    with archive.open(name) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tampered(reason: str, key_id: str | None = None, signed_at: str | None = None) -> BundleSignature:
    return BundleSignature("tampered", f"TAMPERED: {reason}; do not use this bundle", key_id, signed_at)


def verify_bundle(path: str | Path, trusted: dict[str, ed25519.Ed25519PublicKey] | None = None) -> BundleSignature:
    """Check a bundle's signature and checksums (no torch; reads each member once).

    Args:
        path: a ``*.segviz`` bundle.
        trusted: the trusted keys (:func:`read_trust_file`); ``None``: no trust file, so a valid
            signature can only be reported as by an unknown key.

    Returns:
        ``federation`` (valid signature by a trusted key, every member matches the manifest),
        ``unknown-key`` (valid, but the key is not trusted), ``unsigned``, or ``tampered``
        (a signature that does not match, a member changed, added, duplicated or missing).

    Raises:
        BundleError: not a readable zip with a manifest.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _MANIFEST_MEMBER not in names:
                raise BundleError(path, "is not a SegViz model bundle (no manifest.json)")
            duplicated = sorted({n for n in names if names.count(n) > 1})
            if SIGNATURE_MEMBER not in names:
                return BundleSignature("unsigned", "unsigned: nothing proves who made this bundle")
            if duplicated:
                return _tampered(f"member {duplicated[0]} appears twice")
            manifest_bytes = archive.read(_MANIFEST_MEMBER)
            try:
                record = json.loads(archive.read(SIGNATURE_MEMBER))
                public = serialization.load_ssh_public_key(record["public_key"].encode("ascii"))
                key_id, signed_at = str(record["key_id"]), str(record["signed_at"])
                signature = _unb64(str(record["signature"]))
            except (KeyError, TypeError, ValueError, UnicodeError, AttributeError):
                return _tampered("its signature record is malformed")
            if not isinstance(public, ed25519.Ed25519PublicKey) or key_id != public_key_id(public):
                return _tampered("its signature names a key that does not match", key_id, signed_at)
            try:
                public.verify(signature, _bundle_message(manifest_bytes, signed_at))
            except InvalidSignature:
                return _tampered("the manifest does not match its signature", key_id, signed_at)
            try:
                manifest = json.loads(manifest_bytes)
                checksums = dict(manifest["sha256"])
            except (ValueError, KeyError, TypeError):
                return _tampered("the signed manifest has no checksums", key_id, signed_at)
            members = set(names) - {_MANIFEST_MEMBER, SIGNATURE_MEMBER}
            if members != set(checksums):
                extra = sorted(members - set(checksums)) or sorted(set(checksums) - members)
                return _tampered(f"member {extra[0]} is not as the signed manifest lists", key_id, signed_at)
            for name in sorted(members):
                if _member_sha256(archive, name) != checksums[name]:
                    return _tampered(f"{name} changed after signing", key_id, signed_at)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise BundleError(path, f"is not a readable SegViz model bundle (damaged or truncated: {error})") from None
    raw = _raw(public)
    if trusted and any(_raw(k) == raw for k in trusted.values()):
        return BundleSignature("federation", f"signed by the federation key {key_id} on {signed_at}", key_id, signed_at)
    why = "not in the trust file" if trusted else "no trust file given (--trust federation-trust.yaml)"
    return BundleSignature("unknown-key", f"signed by an unknown key {key_id}: {why}", key_id, signed_at)


def bundle_signature(path: str | Path, trust: str | Path | None = None) -> BundleSignature:
    """What ``infer``, ``model-info`` and the Slicer panel show about a bundle: :func:`verify_bundle`
    against the trust file ``trust`` (default: :func:`default_trust_file`).

    Example::

        signature = bundle_signature("model.segviz", "federation-trust.yaml")
        signature.status   # "federation" | "unknown-key" | "unsigned" | "tampered"
        signature.message  # "signed by the federation key fpk_... on 2026-11-27T19:13:21+00:00"

    Raises:
        BundleError: not a readable bundle.
        SegVizInputError: ``trust`` is not a readable trust file.
    """
    return verify_bundle(path, resolve_trust_file(trust))
