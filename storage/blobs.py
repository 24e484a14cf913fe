"""A content-addressed blob store on the local disk: each image lives under its sha256."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from bot.core.models import StoredBlob

from .errors import StorageError

_KEY = re.compile(r"^[0-9a-f]{64}$")
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


def is_key(key: str) -> bool:
    return bool(_KEY.match(key))


class BlobInfo(NamedTuple):
    """One stored object, as a store lists it (`keys()`)."""

    key: str
    ext: str
    size: int
    modified: float  # seconds since the epoch


def parse_name(name: str) -> tuple[str, str] | None:
    """(key, ext) of a stored object's file name, `<sha256>.<ext>`; None for anything else."""
    key, dot, ext = name.partition(".")
    return (key, ext) if dot and is_key(key) and ext in CONTENT_TYPES else None


class LocalBlobStore:
    """Files at `root/ab/<sha256>.png`, served by `easel serve` at `<public_url>/images/<sha256>.png`."""

    def __init__(self, root: str | Path, public_url: str):
        self.root = Path(root)
        self.public_url = public_url.rstrip("/")

    def check_writable(self) -> None:
        """Make the folder if need be and prove a file can be written there: at start-up, not
        after the first image took seconds to make."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except FileExistsError:
            raise StorageError(f"{self.root}: the images folder is a file, not a folder") from None
        except NotADirectoryError:
            raise StorageError(f"{self.root}: part of the images folder's path is a file, not a folder") from None
        except OSError as exc:
            raise StorageError(f"{self.root}: cannot write to the images folder ({exc.strerror})") from None

    def path_for(self, key: str, ext: str = "png") -> Path:
        if not is_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / f"{key}.{ext}"

    def url_for(self, key: str, ext: str = "png") -> str:
        return f"{self.public_url}/images/{key}.{ext}"

    def location(self, key: str, ext: str = "png") -> str:
        """What a job's row records as its image's place: here, the served URL."""
        return self.url_for(key, ext)

    def put(self, data: bytes, ext: str = "png") -> StoredBlob:
        """Store `data` (idempotent: the same bytes land at the same key once)."""
        key = hashlib.sha256(data).hexdigest()
        path = self.path_for(key, ext)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a crash never leaves a half-written image under its key.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return StoredBlob(key=key, url=self.url_for(key, ext), size=len(data), path=path)

    def get(self, key: str, ext: str = "png") -> bytes:
        return self.path_for(key, ext).read_bytes()

    def exists(self, key: str, ext: str = "png") -> bool:
        return self.path_for(key, ext).exists()

    def keys(self) -> Iterator[BlobInfo]:
        """Every stored object (temporary and probe files are no objects)."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                parsed = parse_name(path.name)
                if parsed is None or parsed[0][:2] != folder.name:
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue
                yield BlobInfo(parsed[0], parsed[1], st.st_size, st.st_mtime)

    def delete(self, key: str, ext: str = "png") -> bool:
        """Remove an object; False when it was not there."""
        try:
            self.path_for(key, ext).unlink()
        except FileNotFoundError:
            return False
        return True
