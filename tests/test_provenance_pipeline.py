"""Provenance through the whole pipeline: with a certificate in [provenance], the image a job
stores carries its job's metadata and a signed manifest (created, or edited with the earlier
image as its ingredient), and its key is the hash of those final bytes."""
from __future__ import annotations

import hashlib

import pytest

from bot.config import settings_from_dict
from moderation import NoImageScreen
from tests.fakes.generators import PreparedGenerator
from tests.helpers import job_request, pixels, start_app
from tests.test_provenance import actions, make_credentials

pytest.importorskip("c2pa")


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("ca"))


def app_with(tmp_path, provenance: dict):
    return start_app(settings_from_dict({
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "fake-model"},
        "provenance": provenance,
    }), generators=[PreparedGenerator()], image_screen=NoImageScreen())


async def test_every_stored_image_is_signed_and_a_variation_names_its_source(tmp_path, credentials):
    from storage.provenance import UNTRUSTED, read_provenance

    chain, key = credentials
    app = app_with(tmp_path, {"cert_chain": str(chain), "private_key": str(key)})
    try:
        assert app.provenance.unsigned_reason() is None
        first = await app.service.submit(job_request("imagine", "u1", "a lighthouse --seed 3"))
        second = await app.service.vary(first.job.id, first_requester("u1"))
        stored = [app.blobs.get(o.job.sha256) for o in (first, second)]
    finally:
        await app.close()
    assert [hashlib.sha256(b).hexdigest() for b in stored] == [first.job.sha256, second.job.sha256]
    made, varied = (read_provenance(b) for b in stored)
    assert made.validation == varied.validation == UNTRUSTED
    assert [a["action"] for a in actions(made)] == ["c2pa.created"]
    assert actions(made)[0]["softwareAgent"] == {"name": "fake-model"}
    assert made.metadata["job"] == str(first.job.id) and made.metadata["seed"] == "3"
    assert made.metadata["prompt"] == "a lighthouse"
    assert [a["action"] for a in actions(varied)] == ["c2pa.opened", "c2pa.edited"]
    [ingredient] = varied.active_manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf"
    assert pixels(stored[0]) != pixels(stored[1])


async def test_without_a_certificate_images_carry_metadata_and_say_they_are_unsigned(tmp_path):
    from storage.provenance import NO_MANIFEST, read_provenance

    app = app_with(tmp_path, {})
    try:
        assert "not signed" in app.provenance.unsigned_reason()
        out = await app.service.submit(job_request("imagine", "u1", "a harbour --seed 9"))
        report = read_provenance(app.blobs.get(out.job.sha256))
    finally:
        await app.close()
    assert report.validation == NO_MANIFEST
    assert report.metadata["job"] == str(out.job.id) and report.metadata["model"] == "fake-model"
    assert report.metadata["digital_source_type"].endswith("/trainedAlgorithmicMedia")


def first_requester(user_id: str):
    from bot.core.models import Requester

    return Requester(user_id)
