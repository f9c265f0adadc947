"""Signed artifacts (issue 17): the manifest is covered by a digest and, optionally, an Ed25519
signature that `load(path, public_key=…)` and `legoc run --public-key` verify before reading
anything else."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from legoc.cli import main
from legoc.errors import UserError
from legoc.runtime import load


@pytest.fixture
def art(artifact, tmp_path):
    dst = tmp_path / "copy.lego"
    shutil.copytree(artifact("vgg_chain").artifact, dst)
    return dst


@pytest.fixture
def keys(tmp_path):
    assert main(["keygen", str(tmp_path / "pub")]) == 0
    assert main(["keygen", str(tmp_path / "other")]) == 0
    return {"private": tmp_path / "pub.pem", "public": tmp_path / "pub.pub.pem",
            "other": tmp_path / "other.pub.pem"}


def _x(m):
    return np.random.default_rng(0).standard_normal(m.input_shapes[0]).astype(np.float32)


def test_a_signed_artifact_loads_with_its_public_key_and_not_with_another(art, keys):
    ref = load(art)
    x = _x(ref)
    assert main(["sign", str(art), "--key", str(keys["private"])]) == 0
    m = load(art, public_key=keys["public"])
    assert np.array_equal(np.asarray(m(x)), np.asarray(ref(x)))
    assert load(art, public_key=keys["public"].read_bytes()).manifest == m.manifest   # a key as bytes too
    with pytest.raises(UserError, match="signature does not match the manifest for this public key"):
        load(art, public_key=keys["other"])


def test_unsigned_artifacts_are_refused_when_a_key_is_given(art, keys):
    load(art)                                    # fine without a key
    with pytest.raises(UserError, match="not signed and a public key was given"):
        load(art, public_key=keys["public"])


def test_a_forged_manifest_is_refused(art, keys):
    # an attacker rewrites the manifest and its digest consistently (e.g. to point at other files
    # with matching sha256): only the signature can tell
    assert main(["sign", str(art), "--key", str(keys["private"])]) == 0
    mf = art / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["model"]["name"] = "forged"
    data = json.dumps(manifest).encode()
    mf.write_bytes(data)
    from legoc.runtime.signing import DIGEST, digest_text

    (art / DIGEST).write_text(digest_text(data))
    assert load(art).manifest["model"]["name"] == "forged"      # a digest alone detects corruption, not forgery
    with pytest.raises(UserError, match="signature does not match"):
        load(art, public_key=keys["public"])


def test_a_corrupted_manifest_is_refused_without_a_key(art):
    mf = art / "manifest.json"
    mf.write_bytes(mf.read_bytes() + b"\n")    # still valid JSON, no longer the bytes that were written
    with pytest.raises(UserError, match="does not match manifest.sha256; the manifest was modified or corrupted"):
        load(art)


def test_cli_run_verifies_and_key_errors_are_one_line(art, keys, tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, _x(load(art)))
    assert main(["run", str(art), "--input", str(x), "--public-key", str(keys["public"])]) == 2
    assert "not signed" in capsys.readouterr().err
    assert main(["sign", str(art), "--key", str(keys["private"])]) == 0
    capsys.readouterr()
    assert main(["run", str(art), "--input", str(x), "--public-key", str(keys["public"])]) == 0
    capsys.readouterr()
    for args, expected in ((["keygen", str(tmp_path / "pub")], "exists; choose another name"),
                           (["sign", str(art), "--key", str(keys["public"])], "not a PEM private key"),
                           (["sign", str(art), "--key", str(tmp_path / "none.pem")], "no such private key file"),
                           (["run", str(art), "--input", str(x), "--public-key", str(x)], "not a PEM public key")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "rsa.pem").write_bytes(rsa_pem)
    assert main(["sign", str(art), "--key", str(tmp_path / "rsa.pem")]) == 2
    assert "not Ed25519" in capsys.readouterr().err
