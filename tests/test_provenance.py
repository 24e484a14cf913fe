"""Provenance in stored images: metadata (PNG text chunks, XMP) and signed C2PA manifests, made
with a private CA and leaf from `cryptography` and read back with c2pa-python."""
from __future__ import annotations

import argparse
import datetime
import io
import json
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot import cli_provenance
from bot.config import load_settings
from bot.core.models import GenerationParams, JobRecord, JobStatus, Kind
from storage.errors import StorageError
from storage.provenance import (
    COMPOSITE,
    NO_MANIFEST,
    TRAINED,
    UNSIGNED_REASON,
    UNTRUSTED,
    Provenance,
    carries_manifest,
    image_format,
    ingredient_validation,
    read_metadata,
    read_provenance,
)

ONE_DAY = datetime.timedelta(days=1)


# ---- a private CA and a leaf that C2PA accepts ------------------------------------------


def make_credentials(folder: Path, *, eku: bool = True, days: int = 30) -> tuple[Path, Path]:
    """A CA and an ES256 leaf (the chain and the leaf's key as PEM files in `folder`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "easel tests")])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                               "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**{**flags, **on})

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("easel test CA")).issuer_name(name("easel test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - ONE_DAY).not_valid_after(now + 10 * ONE_DAY * 365)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("easel signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - ONE_DAY - datetime.timedelta(days=max(0, -days)))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if eku:
        leaf = leaf.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    leaf = leaf.sign(ca_key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    chain, key_file = folder / "chain.pem", folder / "key.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_file


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> tuple[Path, Path]:
    return make_credentials(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def signing(credentials) -> Provenance:
    return Provenance(*credentials, app_version="9.9")


UNSIGNED = Provenance()


def image(fmt: str = "PNG", size: tuple[int, int] = (48, 32), mode: str = "RGB", **save) -> bytes:
    """A small picture with detail (a gradient), so that pixel comparisons mean something."""
    img = Image.new(mode, size)
    img.putdata([((x * 5) % 256, (y * 7) % 256, (x * y) % 256, 200)[:len(mode)]
                 for y in range(size[1]) for x in range(size[0])])
    out = io.BytesIO()
    img.save(out, fmt, **save)
    return out.getvalue()


def job(id_: int = 7, kind: Kind = Kind.IMAGINE, **changes) -> JobRecord:
    params = GenerationParams(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry", seed=42,
                              size=(48, 32), steps=4, guidance=7.5, model="tiny", options={"sampler": "euler"})
    return JobRecord(id_, kind, JobStatus.RUNNING, "u1", params, provider="local", **changes)


def pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as img:
        return img.mode, img.size, img.tobytes()


def actions(report) -> list[dict]:
    return next(a["data"]["actions"] for a in report.active_manifest["assertions"]
                if a["label"].startswith("c2pa.actions"))


# ---- metadata ---------------------------------------------------------------------------


def test_png_gets_text_chunks_and_xmp_without_its_pixels_changing():
    original = image()
    stamped = UNSIGNED.stamp(original, job())

    with Image.open(io.BytesIO(stamped)) as img:
        text = dict(img.text)
    assert text["easel:job"] == "7"
    assert text["easel:seed"] == "42"
    assert text["easel:model"] == "tiny"
    assert text["easel:prompt"] == "a lighthouse at dusk, oil painting"
    assert text["easel:negative_prompt"] == "blurry"
    assert text["easel:size"] == "48x32"
    assert text["easel:steps"] == "4"
    assert text["parameters"] == ("a lighthouse at dusk, oil painting\nNegative prompt: blurry\n"
                                  "Steps: 4, Sampler: euler, CFG scale: 7.5, Seed: 42, Size: 48x32, "
                                  "Model: tiny, easel job: 7")
    assert f"<Iptc4xmpExt:DigitalSourceType>{TRAINED}</Iptc4xmpExt:DigitalSourceType>" in text["XML:com.adobe.xmp"]
    assert pixels(stamped) == pixels(original)
    assert read_metadata(stamped)["digital_source_type"] == TRAINED


@pytest.mark.parametrize("fmt, mode, save", [
    ("JPEG", "RGB", {"quality": 90}),
    ("WEBP", "RGB", {"quality": 80}),  # a simple lossy WebP (VP8): gains a VP8X header
    ("WEBP", "RGBA", {"lossless": True}),  # VP8L with alpha: the alpha flag is kept
    ("WEBP", "RGBA", {"quality": 80, "exif": b"Exif\0\0MM\0*\0\0\0\x08\0\0"}),  # already VP8X
])
def test_jpeg_and_webp_get_xmp_without_being_reencoded(fmt, mode, save):
    original = image(fmt, mode=mode, **save)
    stamped = UNSIGNED.stamp(original, job())

    with Image.open(io.BytesIO(stamped)) as img:
        xmp = img.info["xmp"]
        xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
        assert img.format == fmt
    assert f"<Iptc4xmpExt:DigitalSourceType>{TRAINED}</Iptc4xmpExt:DigitalSourceType>" in xmp
    assert pixels(stamped) == pixels(original)
    fields = read_metadata(stamped)
    assert (fields["job"], fields["seed"], fields["model"], fields["size"]) == ("7", "42", "tiny", "48x32")
    assert fields["prompt"] == "a lighthouse at dusk, oil painting"
    assert fields["software"].startswith("easel ")


def test_stamping_again_replaces_the_earlier_metadata():
    once = UNSIGNED.stamp(image(), job(7))
    twice = UNSIGNED.stamp(once, job(8))
    with Image.open(io.BytesIO(twice)) as img:
        assert img.text["easel:job"] == "8"
    assert twice.count(b"iTXteasel:job\0") == 1
    assert twice.count(b"iTXtXML:com.adobe.xmp\0") == 1
    jpeg_twice = UNSIGNED.stamp(UNSIGNED.stamp(image("JPEG"), job(7)), job(8))
    assert jpeg_twice.count(b"http://ns.adobe.com/xap/1.0/\0") == 1
    assert read_metadata(jpeg_twice)["job"] == "8"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(min_size=1, max_size=300), fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]))
def test_any_prompt_round_trips_through_the_metadata(prompt, fmt):
    record = JobRecord(3, Kind.IMAGINE, JobStatus.RUNNING, "u", GenerationParams(prompt=prompt))
    stamped = UNSIGNED.stamp(image(fmt, size=(8, 8)), record)
    got = read_metadata(stamped)["prompt"]
    # Characters XML cannot hold (most control characters) are kept as U+FFFD.
    expected = "".join("\ufffd" if (ord(c) < 32 and c not in "\t\n\r") or c in "\ufffe\uffff" else c
                       for c in prompt)
    assert got == expected


def test_bytes_that_are_no_image_are_refused():
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        UNSIGNED.stamp(b"<html>error</html>", job())
    with pytest.raises(ValueError, match="damaged PNG"):
        read_provenance(image()[:60])
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        read_provenance(b"GIF89a....")


# ---- unsigned ---------------------------------------------------------------------------


def test_unsigned_embeds_metadata_only_and_says_so(signing):
    stamped = UNSIGNED.stamp(image(), job())
    assert UNSIGNED.unsigned_reason() == UNSIGNED_REASON
    assert "not signed" in UNSIGNED_REASON and "[provenance]" in UNSIGNED_REASON
    assert signing.unsigned_reason() is None
    assert not carries_manifest(stamped)
    report = read_provenance(stamped)
    assert report.validation == NO_MANIFEST
    assert not report.valid
    assert report.metadata["job"] == "7"


def test_unsigned_keeps_a_provider_signed_output_as_it_came(signing):
    provider_output = signing.stamp(image(), job(1))  # stands in for an image a provider signed
    assert UNSIGNED.stamp(provider_output, job(2)) == provider_output
    assert read_provenance(provider_output).validation == UNTRUSTED


# ---- signed -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_signed_image_records_its_creation_by_the_model(signing, fmt):
    original = image(fmt)
    stamped = signing.stamp(original, job())
    report = read_provenance(stamped)

    assert image_format(stamped) == {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    assert report.validation == UNTRUSTED
    assert report.valid
    manifest = report.active_manifest
    assert manifest["title"] == "easel job 7"
    assert manifest["claim_generator_info"][0]["name"] == "easel"
    assert manifest["claim_generator_info"][0]["version"] == "9.9"
    assert manifest["signature_info"]["common_name"] == "easel signer"
    assert actions(report) == [{"action": "c2pa.created", "softwareAgent": {"name": "tiny"},
                                "digitalSourceType": TRAINED}]
    assert report.metadata["job"] == "7"
    assert report.metadata["digital_source_type"] == TRAINED
    assert pixels(stamped) == pixels(original)


def test_an_edit_records_edited_with_its_source_as_parent(signing):
    source = image(size=(48, 32))
    stamped = signing.stamp(image(), job(9, Kind.EDIT, source_job_id=7), source=source)
    report = read_provenance(stamped)

    assert report.validation == UNTRUSTED
    opened, edited = actions(report)
    assert opened["action"] == "c2pa.opened"
    assert edited["action"] == "c2pa.edited"
    assert edited["softwareAgent"] == {"name": "tiny"}
    assert edited["digitalSourceType"] == COMPOSITE
    assert edited["description"] == "edit of job 7"
    [ingredient] = report.active_manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf"
    assert ingredient["title"] == "the source image of job 9"
    assert ingredient_validation(ingredient) == NO_MANIFEST
    assert report.metadata["source_job"] == "7"
    assert report.metadata["digital_source_type"] == COMPOSITE


def test_a_source_with_its_own_manifest_keeps_it_as_an_ingredient(signing):
    signed_source = signing.stamp(image("JPEG"), job(7))
    source_label = read_provenance(signed_source).manifest_store["active_manifest"]

    variation = signing.stamp(image(), job(8, Kind.VARIATION, source_job_id=7), source=signed_source)
    report = read_provenance(variation)

    assert report.validation == UNTRUSTED
    [ingredient] = report.active_manifest["ingredients"]
    assert ingredient["active_manifest"] == source_label
    assert source_label in report.manifest_store["manifests"]
    assert ingredient_validation(ingredient) == UNTRUSTED
    kept = report.manifest_store["manifests"][source_label]
    assert kept["title"] == "easel job 7"
    assert actions(report)[1]["description"] == "variation of job 7"


def test_a_provider_manifest_in_the_output_is_kept_as_a_component(signing):
    provider_output = signing.stamp(image(), job(1))
    stamped = signing.stamp(provider_output, job(2))
    report = read_provenance(stamped)

    assert report.validation == UNTRUSTED
    assert [a["action"] for a in actions(report)] == ["c2pa.created", "c2pa.placed"]
    [ingredient] = report.active_manifest["ingredients"]
    assert ingredient["relationship"] == "componentOf"
    assert ingredient_validation(ingredient) == UNTRUSTED
    assert report.metadata["job"] == "2"


def test_a_source_c2pa_cannot_read_is_still_named(signing):
    stamped = signing.stamp(image(), job(5, Kind.EDIT), source=b"GIF89a not really")
    report = read_provenance(stamped)
    [ingredient] = report.active_manifest["ingredients"]
    assert report.validation == UNTRUSTED
    assert ingredient["title"] == "the source image of job 5"
    assert actions(report)[1]["description"] == "edit of an uploaded image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_changing_the_bytes_after_signing_reads_back_invalid(signing, fmt):
    stamped = bytearray(signing.stamp(image(fmt, size=(64, 64)), job()))
    at = stamped.find(b"IDAT") + 20 if fmt == "PNG" else len(stamped) - 40  # inside the image data
    stamped[at] ^= 0xFF
    report = read_provenance(bytes(stamped))
    assert report.validation.startswith("invalid: ")
    assert "dataHash.mismatch" in report.validation
    assert not report.valid


def test_stamping_from_many_threads_signs_every_image(signing):
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = read_provenance(signing.stamp(image(), job(i))).validation

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == dict.fromkeys(range(8), UNTRUSTED)


# ---- bad certificates and keys ----------------------------------------------------------


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> tuple[Path, Path]:
    return make_credentials(tmp_path_factory.mktemp("other"))


def _encrypted(key: Path, folder: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    out = folder / "encrypted.pem"
    out.write_bytes(loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    return out


@pytest.mark.parametrize("case, message", [
    ("missing chain", "cert_chain {dir}/nope.pem: file not found"),
    ("chain not PEM", "not a PEM certificate chain"),
    ("key not PEM", "not a PEM private key"),
    ("key of another leaf", "is not the key of the first certificate in cert_chain"),
    ("encrypted key", "the key is encrypted"),
    ("key is a folder", "not a PEM file"),
    ("only the chain", "[provenance] private_key is not set"),
    ("no extended key usage", "c2pa cannot sign with it"),
    ("expired", "not now"),
])
def test_bad_credentials_fail_at_start_up_with_one_line(tmp_path, credentials, other, case, message):
    chain, key = credentials
    if case == "missing chain":
        chain = tmp_path / "nope.pem"
    elif case == "chain not PEM":
        chain = tmp_path / "chain.txt"
        chain.write_text("hello")
    elif case == "key not PEM":
        key = chain  # a certificate where the key should be
    elif case == "key of another leaf":
        key = other[1]
    elif case == "encrypted key":
        key = _encrypted(key, tmp_path)
    elif case == "key is a folder":
        key = tmp_path
    elif case == "only the chain":
        key = None
    elif case == "no extended key usage":
        chain, key = make_credentials(tmp_path / "noeku", eku=False)
    elif case == "expired":
        chain, key = make_credentials(tmp_path / "old", days=-2)

    with pytest.raises(StorageError) as err:
        Provenance(chain, key)
    text = str(err.value)
    assert message.format(dir=tmp_path) in text
    assert "\n" not in text
    for secret in (credentials[1], other[1]):  # no line of any key's PEM body appears
        body = [line for line in secret.read_text().splitlines() if "-----" not in line]
        assert not any(line in text for line in body)


# ---- the command line -------------------------------------------------------------------


def verify(path: Path, *extra: str, capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="easel")
    cli_provenance.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["provenance", "verify", str(path), *extra])
    code = cli_provenance.run(None, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_a_signed_image_says_plainly_that_it_is_untrusted(signing, tmp_path, capsys):
    path = tmp_path / "signed.png"
    path.write_bytes(signing.stamp(image(), job()))
    code, out, _ = verify(path, capsys=capsys)

    assert code == 0
    assert f"{path}: PNG with a C2PA manifest: valid (untrusted: signed by a private CA)" in out
    assert "no public trust list knows" in out
    assert "signed by: easel signer (issued by easel tests), Es256" in out
    assert "action: c2pa.created by tiny (trainedAlgorithmicMedia)" in out
    assert "  seed: 42" in out

    code, out, _ = verify(path, "--json", capsys=capsys)
    shown = json.loads(out)
    assert code == 0
    assert shown["validation"] == UNTRUSTED and shown["valid"] is True
    assert shown["metadata"]["job"] == "7"
    assert shown["manifest_store"]["active_manifest"] in shown["manifest_store"]["manifests"]


def test_verify_exits_1_for_no_manifest_or_a_broken_one(signing, tmp_path, capsys):
    unsigned = tmp_path / "unsigned.jpg"
    unsigned.write_bytes(UNSIGNED.stamp(image("JPEG"), job()))
    code, out, _ = verify(unsigned, capsys=capsys)
    assert code == 1
    assert f"{unsigned}: JPEG, no C2PA manifest" in out
    assert "  job: 7" in out

    tampered = bytearray(signing.stamp(image(size=(64, 64)), job()))
    tampered[tampered.find(b"IDAT") + 20] ^= 0xFF
    broken = tmp_path / "broken.png"
    broken.write_bytes(bytes(tampered))
    code, out, _ = verify(broken, capsys=capsys)
    assert code == 1
    assert "PNG with a C2PA manifest: invalid: " in out


def test_verify_exits_2_for_what_is_not_a_readable_image(tmp_path, capsys):
    html = tmp_path / "page.png"
    html.write_text("<html>not an image</html>")
    for path, says in ((tmp_path / "missing.png", "image not found"), (tmp_path, "is a directory"),
                       (html, "not a PNG, JPEG or WebP image"), (Path("/dev/zero"), "not a regular file")):
        code, out, err = verify(path, capsys=capsys)
        assert code == 2, path
        assert out == ""
        assert says in err and err.startswith("easel: ")


# ---- settings ---------------------------------------------------------------------------


def test_settings_resolve_the_pem_paths_against_the_config_file(tmp_path, monkeypatch):
    for name in ("EASEL_PROVENANCE__CERT_CHAIN", "EASEL_PROVENANCE__PRIVATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "conf" / "easel.toml"
    config.parent.mkdir()
    config.write_text('[provenance]\ncert_chain = "pki/chain.pem"\nprivate_key = "/abs/key.pem"\n')
    loaded = load_settings(str(config))
    assert loaded.provenance.provenance_kwargs(loaded) == {
        "cert_chain": tmp_path / "conf" / "pki" / "chain.pem", "private_key": Path("/abs/key.pem")}

    config.write_text("")
    unsigned = load_settings(str(config))
    assert unsigned.provenance.provenance_kwargs(unsigned) == {"cert_chain": None, "private_key": None}
    assert Provenance(**unsigned.provenance.provenance_kwargs(unsigned)).unsigned_reason() == UNSIGNED_REASON
