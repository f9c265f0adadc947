"""Signed artifacts: an Ed25519 signature over the manifest, which lists the sha256 of every other
file, so one signature covers the whole artifact.

Threat model: an app on the device receives artifacts over the air. Anyone on the way (or with
write access to the device's storage) could replace a module, its weights, or the manifest itself
together with matching checksums. The app holds the publisher's *public* key; ``load(path,
public_key=…)`` verifies ``manifest.sig`` against the manifest's exact bytes before it parses
anything, and every file is then checked against the signed sha256 before it is used. Without a
key, the unsigned ``manifest.sha256`` still detects a corrupted manifest (not a forged one).

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), made with ``legoc keygen`` or
``openssl genpkey -algorithm ed25519``. The cryptography is PyCA's ``cryptography`` package (a
well-kept, audited binding of OpenSSL), not code of ours.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from legoc.errors import UserError

SIGNATURE = "manifest.sig"
DIGEST = "manifest.sha256"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:   # pragma: no cover - installed with legoc
        raise UserError("signed artifacts need the 'cryptography' package: pip install cryptography") from exc
    return serialization, ed25519


def read_key(key: str | os.PathLike | bytes, private: bool):
    serialization, ed25519 = _crypto()
    what = "private" if private else "public"
    data = key if isinstance(key, bytes) else None
    if data is None:
        path = Path(key)
        if not path.is_file():
            raise UserError(f"{path}: no such {what} key file; make a key pair with `legoc keygen KEY`")
        data = path.read_bytes()
    try:
        obj = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise UserError(f"not a PEM {what} key ({exc}); make a key pair with `legoc keygen KEY`") from exc
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(obj, want):
        raise UserError(f"the {what} key is {type(obj).__name__.lstrip('_')}, not Ed25519; make one with `legoc keygen KEY`")
    return obj


def keygen(stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new key pair ``STEM.pem`` (private, mode 0600) and ``STEM.pub.pem``; refuses to overwrite."""
    serialization, ed25519 = _crypto()
    priv_path, pub_path = Path(f"{stem}.pem"), Path(f"{stem}.pub.pem")
    for p in (priv_path, pub_path):
        if p.exists():
            raise UserError(f"{p} exists; choose another name (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def digest_text(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest() + "  manifest.json\n"


def sign(root: str | os.PathLike, private_key: str | os.PathLike | bytes) -> Path:
    """Sign an artifact's manifest with ``private_key``; writes ``manifest.sig`` (atomically)."""
    root = Path(root)
    data = _manifest_bytes(root)
    signature = read_key(private_key, private=True).sign(data)
    tmp = root / f".{SIGNATURE}.tmp"
    tmp.write_bytes(signature)
    os.replace(tmp, root / SIGNATURE)
    return root / SIGNATURE


def verify(root: str | os.PathLike, manifest_bytes: bytes, public_key: str | os.PathLike | bytes | None) -> None:
    """Check the manifest's digest file and, with ``public_key``, its signature. Raises UserError."""
    root = Path(root)
    digest = root / DIGEST
    if digest.is_file() and digest.read_text() != digest_text(manifest_bytes):
        raise UserError(f"{root / 'manifest.json'}: does not match {DIGEST}; the manifest was modified or "
                        "corrupted: refusing to load it")
    if public_key is None:
        return
    key = read_key(public_key, private=False)
    from cryptography.exceptions import InvalidSignature

    sig = root / SIGNATURE
    if not sig.is_file():
        raise UserError(f"{root}: the artifact is not signed and a public key was given: refusing to load it; "
                        "sign it with `legoc sign ART --key KEY.pem`")
    try:
        key.verify(sig.read_bytes(), manifest_bytes)
    except InvalidSignature:
        raise UserError(f"{root}: the signature does not match the manifest for this public key: the artifact "
                        "was modified or signed by someone else: refusing to load it") from None


def _manifest_bytes(root: Path) -> bytes:
    path = root / "manifest.json"
    if not path.is_file():
        raise UserError(f"{root}: not a legoc artifact (no manifest.json)")
    return path.read_bytes()
