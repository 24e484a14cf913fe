"""The S3 blob store against moto's S3 server on 127.0.0.1 (the real aioboto3 client on the real
wire format), a flaky proxy in front of it, and a port where nothing listens."""
from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from bot.bootstrap import open_storage
from bot.config import ConfigError, settings_from_dict
from storage.errors import StorageError
from storage.s3 import PROBE_NAME, S3BlobStore
from tests.helpers import free_port

BUCKET = "easel-test"
SECRET = "moto-secret-never-shown"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAEASELTEST",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance role
    "AWS_CONFIG_FILE": "/nonexistent/easel-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/easel-aws-credentials",
}


@dataclass(frozen=True)
class Moto:
    endpoint: str
    port: int

    def client(self):
        """A plain boto3 client, to look at the bucket from outside the store."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def store(self, **kwargs) -> S3BlobStore:
        kwargs.setdefault("prefix", "images")
        return S3BlobStore(BUCKET, endpoint_url=self.endpoint, region="us-east-1", **kwargs)


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    """moto's S3 server on a free port of 127.0.0.1, with a bucket and test credentials."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        try:
            _, port = server.get_host_and_port()
            found = Moto(f"http://127.0.0.1:{port}", port)
            found.client().create_bucket(Bucket=BUCKET)
            yield found
        finally:
            server.stop()


@pytest.fixture(scope="module")
def store(moto) -> Iterator[S3BlobStore]:
    s = moto.store()
    yield s
    s.close()


def png(tag: str) -> bytes:
    """Distinct bytes per test (the stores share one bucket); the store does not decode them."""
    return b"\x89PNG\r\n\x1a\n" + f"{tag} {os.urandom(8).hex()}".encode() * 50


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the store's surface ------------------------------------------------------------------


def test_put_then_get_exists_and_where_it_lies(store, moto):
    data = png("round trip")
    blob = store.put(data)
    key = key_of(data)

    assert blob.key == key and blob.size == len(data) and blob.path is None
    assert blob.url == f"s3://{BUCKET}/images/{key[:2]}/{key}.png"
    assert store.get(key) == data
    assert store.exists(key)
    head = moto.client().head_object(Bucket=BUCKET, Key=f"images/{key[:2]}/{key}.png")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == len(data)


def test_a_missing_object_is_not_found(store):
    absent = key_of(b"never stored")
    assert not store.exists(absent)
    with pytest.raises(FileNotFoundError):
        store.get(absent)


def test_put_sends_the_sha256_checksum(store, moto):
    data = png("checksum")
    key = store.put(data).key
    head = moto.client().head_object(Bucket=BUCKET, Key=f"images/{key[:2]}/{key}.png", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_put_of_stored_bytes_uploads_nothing(store, moto):
    data = png("idempotent")
    first = store.put(data)
    name = f"images/{first.key[:2]}/{first.key}.png"
    # Change the object behind the store's back: a second put must not upload again.
    moto.client().put_object(Bucket=BUCKET, Key=name, Body=b"changed outside")
    again = store.put(data)

    assert again == first
    assert moto.client().get_object(Bucket=BUCKET, Key=name)["Body"].read() == b"changed outside"


def test_keys_lists_only_objects_and_delete_removes_one(moto):
    s = moto.store(prefix="keys-test/")
    try:
        stored = {s.put(png(f"key {i}")).key for i in range(3)}
        s.check_writable()  # the probe object is no image
        moto.client().put_object(Bucket=BUCKET, Key="keys-test/notes.txt", Body=b"not ours")
        listed = list(s.keys())
        assert {b.key for b in listed} == stored
        assert all(b.ext == "png" and b.size > 400 and abs(b.modified - time.time()) < 300 for b in listed)

        gone = sorted(stored)[0]
        assert s.delete(gone) is True
        assert s.delete(gone) is False
        assert {b.key for b in s.keys()} == stored - {gone}
    finally:
        s.close()


def test_bad_keys_and_extensions_are_refused(store):
    for key, ext in (("../../etc/passwd", "png"), ("A" * 64, "png"), ("a" * 64, "exe")):
        with pytest.raises(ValueError):
            store.get(key, ext)


def test_many_threads_share_one_store(store):
    blobs = [png(f"thread {i}") for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda d: store.put(d).key, blobs))
        back = list(pool.map(store.get, keys))
    assert back == blobs


def test_calling_the_store_on_its_own_loop_is_refused(store):
    import asyncio

    async def on_the_loop():
        return store.exists(key_of(b"x"))

    future = asyncio.run_coroutine_threadsafe(on_the_loop(), store._loop)
    with pytest.raises(RuntimeError, match="worker thread"):
        future.result(5)


def test_a_closed_store_says_so(moto):
    s = moto.store()
    s.close()
    s.close()  # twice is fine
    with pytest.raises(StorageError, match="closed"):
        s.put(b"late")


# ---- URLs ---------------------------------------------------------------------------------


def test_public_base_url_makes_plain_urls(moto):
    s = moto.store(public_base_url="https://cdn.example/easel/")
    try:
        key = s.put(png("public")).key
        expected = f"https://cdn.example/easel/images/{key[:2]}/{key}.png"
        assert s.url_for(key) == expected
        assert s.location(key) == expected
    finally:
        s.close()


def test_presigned_url_serves_the_bytes_and_is_made_afresh(moto):
    s = moto.store(presign_ttl_s=120)
    try:
        data = png("presigned")
        key = s.put(data).key
        url = s.url_for(key)
        assert "X-Amz-Expires=120" in url and "X-Amz-Signature=" in url
        assert SECRET not in url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == data
        time.sleep(1.05)  # signatures carry the second they were made
        assert s.url_for(key) != url
    finally:
        s.close()


# ---- failures -----------------------------------------------------------------------------


class FlakyProxy:
    """A proxy in front of moto on 127.0.0.1 that answers the first `failures` requests with an
    S3 error (503 SlowDown by default) and forwards the rest."""

    def __init__(self, target_port: int, failures: int, status: int = 503, code: str = "SlowDown"):
        self.failures, self.status, self.code, self.seen = failures, status, code, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for botocore's uploads

            def log_message(self, *args):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    error = f"<Error><Code>{proxy.code}</Code><Message>no</Message></Error>".encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(b"" if self.command == "HEAD" else error)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "host")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "server", "date"):
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_transient_errors_are_retried_then_the_put_succeeds(moto):
    with FlakyProxy(moto.port, failures=2) as proxy:
        s = S3BlobStore(BUCKET, prefix="images", endpoint_url=f"http://127.0.0.1:{proxy.port}",
                        attempts=4, base_delay_s=0.01, timeout_s=5)
        try:
            data = png("flaky")
            key = s.put(data).key
        finally:
            s.close()
    assert proxy.seen >= 4  # two refusals, then the look-up and the upload
    assert moto.client().get_object(Bucket=BUCKET, Key=f"images/{key[:2]}/{key}.png")["Body"].read() == data


def test_a_server_that_keeps_failing_gives_a_storage_error_after_the_retries(moto):
    with FlakyProxy(moto.port, failures=1000) as proxy:
        s = S3BlobStore(BUCKET, endpoint_url=f"http://127.0.0.1:{proxy.port}", attempts=3, base_delay_s=0.01, timeout_s=5)
        try:
            with pytest.raises(StorageError) as err:
                s.put(png("down"))
        finally:
            s.close()
    assert proxy.seen == 3
    message = str(err.value)
    assert f"S3 bucket '{BUCKET}'" in message and "after 3 attempts (HTTP 503)" in message
    assert SECRET not in message and AWS_ENV["AWS_ACCESS_KEY_ID"] not in message


def test_access_denied_is_not_retried(moto):
    with FlakyProxy(moto.port, failures=1000, status=403, code="AccessDenied") as proxy:
        s = S3BlobStore(BUCKET, endpoint_url=f"http://127.0.0.1:{proxy.port}", attempts=3, base_delay_s=0.01, timeout_s=5)
        try:
            with pytest.raises(StorageError, match="access denied"):
                s.check_writable()
        finally:
            s.close()
    assert proxy.seen == 1


def test_nothing_listening_gives_a_storage_error(moto):
    port = free_port()
    s = S3BlobStore(BUCKET, endpoint_url=f"http://user:{SECRET}@127.0.0.1:{port}", attempts=2,
                    base_delay_s=0.01, timeout_s=2)
    try:
        start = time.perf_counter()
        with pytest.raises(StorageError) as err:
            s.put(png("nobody"))
        assert time.perf_counter() - start < 10
    finally:
        s.close()
    assert "cannot connect" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    assert SECRET not in str(err.value)


def test_missing_credentials_are_named_not_shown(moto, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s = moto.store(attempts=1)
    try:
        with pytest.raises(StorageError, match="no usable credentials"):
            s.put(png("no credentials"))
    finally:
        s.close()


# ---- settings and wiring ------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("EASEL_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("storage, message", [
    ({"backend": "s3"}, "'storage.s3' needs a bucket when storage.backend is \"s3\": set storage.s3.bucket"),
    ({"backend": "s3", "s3": {"bucket": "  "}}, "set storage.s3.bucket"),
    ({"backend": "gcs"}, "'storage.backend' must be \"local\" or \"s3\""),
    ({"s3": {"endpoint_url": "minio:9000"}}, "'storage.s3.endpoint_url' must start with http:// or https://"),
    ({"s3": {"public_base_url": "cdn.example"}}, "'storage.s3.public_base_url' must start with http://"),
    ({"s3": {"presign_ttl_s": 10}}, "'storage.s3.presign_ttl_s' must be 60-604800"),
    ({"s3": {"prefix": "a/../b"}}, "'storage.s3.prefix' cannot contain '..'"),
    ({"s3": {"bukcet": "x"}}, "unknown key 'storage.s3.bukcet' (did you mean 'storage.s3.bucket'?)"),
])
def test_bad_s3_settings_name_the_key(clean_env, storage, message):
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"storage": storage}, where="easel.toml")
    assert message in str(err.value) and str(err.value).startswith("easel.toml: ")


def test_s3_settings_from_the_environment(clean_env, monkeypatch):
    monkeypatch.setenv("EASEL_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("EASEL_STORAGE__S3__BUCKET", "from-env")
    s3 = settings_from_dict({}).storage.s3
    assert s3.bucket == "from-env" and s3.prefix == "images" and s3.presign_ttl_s == 3600


def test_open_storage_builds_the_s3_store_and_probes_it(clean_env, moto, tmp_path):
    settings = settings_from_dict({"storage": {
        "backend": "s3", "database": str(tmp_path / "easel.db"),
        "s3": {"bucket": BUCKET, "prefix": "wired", "endpoint_url": moto.endpoint, "region": "us-east-1"},
    }})
    db, blobs = open_storage(settings)
    try:
        assert isinstance(blobs, S3BlobStore)
        assert moto.client().head_object(Bucket=BUCKET, Key=f"wired/{PROBE_NAME}")["ContentLength"] == 5
        key = blobs.put(b"wired").key
        assert blobs.location(key) == f"s3://{BUCKET}/wired/{key[:2]}/{key}.png"
    finally:
        db.close()
        blobs.close()


def test_open_storage_names_the_setting_when_the_bucket_is_unreachable(clean_env, tmp_path):
    settings = settings_from_dict({"storage": {
        "backend": "s3", "database": str(tmp_path / "easel.db"),
        "s3": {"bucket": BUCKET, "endpoint_url": f"http://127.0.0.1:{free_port()}"},
    }})
    with pytest.raises(ConfigError) as err:
        open_storage(settings)
    assert str(err.value).startswith("storage.s3 (from built-in defaults): S3 bucket 'easel-test'")
    assert "cannot write to the bucket" in str(err.value)
    assert not (tmp_path / "easel.db").exists()  # nothing opened after the store failed
