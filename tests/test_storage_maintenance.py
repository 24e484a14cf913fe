"""`easel storage verify | gc | migrate`, through the command line, on a real database and images
folder, and on moto's S3 server on 127.0.0.1."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from bot import cli, cli_storage
from bot.config import load_settings
from bot.core.models import JobStatus, Kind, ModerationEvent
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.jobs import JobStore
from storage.moderation_log import ModerationLog
from tests.helpers import write_config
from tests.test_s3_store import BUCKET, moto  # noqa: F401  (the moto server fixture)

PUBLIC = "http://127.0.0.1:8080"
OLD = time.time() - 2 * 86400


def easel(config: Path, *argv: str) -> int:
    """`easel --config CONFIG storage ARGV...`: through bot.cli.main once it has the command."""
    parser = cli.build_parser()
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "storage" in commands:
        return cli.main(["--config", str(config), "storage", *argv])
    own = argparse.ArgumentParser(prog="easel")
    cli_storage.add_parser(own.add_subparsers(dest="command", required=True))
    return cli_storage.run(load_settings(str(config)), own.parse_args(["storage", *argv]))


class Workspace:
    """An easel.toml with its database and images folder, and jobs that point into it."""

    def __init__(self, root: Path, **storage):
        self.root = root
        self.config = root / "easel.toml"
        self.images = LocalBlobStore(root / "images", PUBLIC)
        self.write(**storage)
        self.db = Database(root / "easel.db")
        self.jobs = JobStore(self.db)

    def write(self, s3: dict | None = None, moderation: dict | None = None, **storage) -> None:
        tables = {"storage": {"database": "easel.db", "images_dir": "images", "public_url": PUBLIC, **storage},
                  "moderation": {"image_classifier": "none", **(moderation or {})}}
        if s3:
            tables["storage.s3"] = s3
        write_config(self.config, tables)

    def job(self, tag: str, **uploads: bytes) -> tuple[int, str]:
        """A finished job whose image (and uploads: source=, mask=) are stored; (id, image key)."""
        blob = self.images.put(png(tag))
        kept = {f"{name}_sha256": self.images.put(data).key for name, data in uploads.items()}
        job = self.jobs.create(kind=Kind.IMAGINE, status=JobStatus.DONE, user_id="u1", prompt=tag,
                               sha256=blob.key, image_url=blob.url, **kept)
        return job.id, blob.key

    def age(self, key: str) -> None:
        os.utime(self.images.path_for(key), (OLD, OLD))


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("EASEL_FORCE_TERMINAL", "0")
    for name in list(os.environ):
        if name.upper().startswith("EASEL_") and name != "EASEL_FORCE_TERMINAL":
            monkeypatch.delenv(name)
    w = Workspace(tmp_path)
    yield w
    w.db.close()


def png(tag: str) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + f"{tag} {uuid.uuid4()}".encode() * 40


# ---- verify -------------------------------------------------------------------------------


def test_verify_passes_when_every_image_is_intact(ws, capsys):
    ws.job("one")
    ws.job("two", source=png("upload"), mask=png("mask"))

    assert easel(ws.config, "verify") == 0
    assert capsys.readouterr().out.strip() == "4 objects checked: all intact"


def test_verify_lists_missing_and_damaged_objects(ws, capsys):
    intact_id, _ = ws.job("fine")
    missing_id, missing = ws.job("will vanish")
    damaged_id, damaged = ws.job("will rot")
    edit_id, _ = ws.job("edit", source=b"source bytes")
    source_missing = hashlib.sha256(b"source bytes").hexdigest()
    ws.images.path_for(missing).unlink()
    ws.images.path_for(damaged).write_bytes(b"bit rot")
    ws.images.path_for(source_missing).unlink()

    assert easel(ws.config, "verify") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "5 objects checked: 3 problems"
    rows = {line.split("\t")[1]: line.split("\t") for line in out[:-1]}
    assert rows[f"{missing}.png"][2:] == ["missing", f"job {missing_id} (image)"]
    assert rows[f"{damaged}.png"][2].startswith("damaged (its bytes hash to ")
    assert rows[f"{source_missing}.png"][2:] == ["missing", f"job {edit_id} (source)"]
    assert f"job {intact_id} " not in "\n".join(out)

    assert easel(ws.config, "verify", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 5
    assert {(p["key"], p["problem"]) for p in report["problems"]} == {
        (missing, "missing"), (damaged, "damaged"), (source_missing, "missing")}
    assert f"job {damaged_id} (image)" in next(p for p in report["problems"] if p["key"] == damaged)["referrers"]


def test_verify_checks_the_review_store_too(ws, capsys):
    review = LocalBlobStore(ws.root / "review", "review://")
    kept = review.put(png("blocked output")).key
    lost = hashlib.sha256(b"a blocked output that is gone").hexdigest()
    log = ModerationLog(ws.db)
    for key in (kept, lost):
        log.record(ModerationEvent(user_id="u1", guild_id=None, channel_id=None, job_id=None, stage="output",
                                   rule="nudity", score=0.9, prompt=None, created_at=time.time(), review_sha256=key))
    ws.write(moderation={"keep_blocked_outputs": True, "review_dir": "review"})

    assert easel(ws.config, "verify", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 2
    assert [(p["store"], p["key"], p["problem"]) for p in report["problems"]] == [("review", lost, "missing")]


# ---- gc -----------------------------------------------------------------------------------


def test_gc_is_a_dry_run_until_apply(ws, capsys):
    _, used = ws.job("kept")
    orphan = ws.images.put(png("orphan")).key
    fresh = ws.images.put(png("just stored, its row not yet written")).key
    for key in (used, orphan):
        ws.age(key)

    assert easel(ws.config, "gc") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{orphan}.png", "1 objects no job refers to; a dry run: pass --apply to remove them"]
    assert ws.images.exists(orphan)

    assert easel(ws.config, "gc", "--apply", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"dry_run": False, "objects": [f"{orphan}.png"]}
    assert not ws.images.exists(orphan)
    assert ws.images.exists(used) and ws.images.exists(fresh)

    assert easel(ws.config, "gc", "--apply", "--min-age", "0") == 0
    assert f"{fresh}.png" in capsys.readouterr().out
    assert not ws.images.exists(fresh)
    assert easel(ws.config, "verify") == 0


def test_gc_keeps_uploads_that_jobs_refer_to(ws, capsys):
    ws.job("edit", source=png("upload"), mask=png("mask"))
    for info in ws.images.keys():
        ws.age(info.key)

    assert easel(ws.config, "gc", "--apply", "--min-age", "0") == 0
    assert capsys.readouterr().out.strip() == "removed 0 objects no job refers to"
    assert len(list(ws.images.keys())) == 3


# ---- migrate ------------------------------------------------------------------------------


def s3_table(moto, prefix: str) -> dict:  # noqa: F811
    return {"bucket": BUCKET, "prefix": prefix, "endpoint_url": moto.endpoint, "region": "us-east-1"}


def test_migrate_copies_to_the_bucket_and_switches_the_rows(ws, moto, capsys):  # noqa: F811
    prefix = f"migrate-{uuid.uuid4().hex[:8]}"
    ws.write(s3=s3_table(moto, prefix))
    made = [ws.job("a"), ws.job("b", source=png("upload")), ws.job("c")]

    assert easel(ws.config, "migrate", "--to", "s3") == 0
    out = capsys.readouterr().out
    assert "copied 4 objects" in out and "0 already there; 3 jobs switched to it" in out
    assert 'next: set [storage] backend = "s3"' in out
    for job_id, key in made:
        assert ws.jobs.get(job_id).image_url == f"s3://{BUCKET}/{prefix}/{key[:2]}/{key}.png"
        body = moto.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{key[:2]}/{key}.png")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == key

    # Again: nothing to copy, nothing to switch.
    assert easel(ws.config, "migrate", "--to", "s3", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["copied"], again["present"], again["rows_switched"], again["problems"]) == (0, 4, 0, [])

    # On the bucket now: verify reads it, and sees an object damaged there.
    ws.write(backend="s3", s3=s3_table(moto, prefix))
    assert easel(ws.config, "verify") == 0
    assert capsys.readouterr().out.strip() == "4 objects checked: all intact"
    _, rotten = made[2]
    moto.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{rotten[:2]}/{rotten}.png", Body=b"rot")
    assert easel(ws.config, "verify") == 1
    assert f"{rotten}.png\tdamaged" in capsys.readouterr().out


def test_migrate_leaves_the_rows_of_objects_it_could_not_copy(ws, moto, capsys):  # noqa: F811
    prefix = f"partial-{uuid.uuid4().hex[:8]}"
    ws.write(s3=s3_table(moto, prefix))
    ok_id, ok = ws.job("fine")
    lost_id, lost = ws.job("lost")
    ws.images.path_for(lost).unlink()

    assert easel(ws.config, "migrate", "--to", "s3") == 1
    out = capsys.readouterr().out
    assert f"{lost}.png\tmissing\tjob {lost_id} (image)" in out
    assert "1 objects could not be copied" in out
    assert ws.jobs.get(ok_id).image_url.startswith(f"s3://{BUCKET}/{prefix}/")
    assert ws.jobs.get(lost_id).image_url == f"{PUBLIC}/images/{lost}.png"


def test_migrate_without_a_bucket_is_a_settings_error(ws, capsys):
    ws.job("a")
    assert easel(ws.config, "migrate", "--to", "s3") == 2
    err = capsys.readouterr().err
    assert "storage.s3.bucket" in err and str(ws.config) in err


def test_gc_on_the_bucket(ws, moto, capsys):  # noqa: F811
    prefix = f"gc-{uuid.uuid4().hex[:8]}"
    ws.write(backend="s3", s3=s3_table(moto, prefix))
    from storage.s3 import S3BlobStore

    bucket = S3BlobStore(BUCKET, prefix=prefix, endpoint_url=moto.endpoint)
    try:
        used = bucket.put(b"used")
        orphan = bucket.put(b"orphan").key
        ws.jobs.create(kind=Kind.IMAGINE, status=JobStatus.DONE, user_id="u1", sha256=used.key, image_url=used.url)

        assert easel(ws.config, "gc", "--min-age", "0") == 0
        assert capsys.readouterr().out.splitlines()[0] == f"{orphan}.png"
        assert bucket.exists(orphan)
        assert easel(ws.config, "gc", "--apply", "--min-age", "0") == 0
        assert not bucket.exists(orphan) and bucket.exists(used.key)
    finally:
        bucket.close()
