"""Small helpers shared by the tests: settings files, free ports, PNG bytes, a ledger worker."""
from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path
from typing import Any


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write an easel TOML file; `sections` maps a table name ("generators.local") to its keys."""
    lines = []
    for table, values in sections.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def write_workspace_config(root: Path, *, image_classifier: str = "none", **sections) -> int:
    """An easel.toml in `root` with data under root/data and the image server on a free port
    (returned); `sections` add or replace tables."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    write_config(root / "easel.toml", {
        "storage": {"database": "data/easel.db", "images_dir": "data/images",
                    "public_url": f"http://127.0.0.1:{port}"},
        "server": {"port": port},
        "moderation": {"image_classifier": image_classifier},
        **sections,
    })
    return port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_declaring(width: int, height: int, rows: int = 1) -> bytes:
    """A 1-bit greyscale PNG whose header declares `width`x`height` but whose data holds only
    `rows` rows: a decompression bomb in miniature (a decoder that trusts the header allocates
    width*height pixels before noticing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(row * rows, 9)) + chunk(b"IEND", b""))


def reserve_in_own_connection(db_path: str, user_id: str, job_id: int, amount_micros: int,
                              allowance_micros: int, start, results) -> None:
    """Run in a separate process: open the database afresh, wait for `start`, try to reserve,
    and put (job_id, succeeded) on `results`."""
    from storage.db import Database
    from storage.ledger import InsufficientFunds, Ledger

    db = Database(db_path)
    ledger = Ledger(db, allowance_micros)
    start.wait()
    try:
        ledger.reserve(user_id, job_id, amount_micros)
        results.put((job_id, True))
    except InsufficientFunds:
        results.put((job_id, False))
    finally:
        db.close()


_PARAMS = {"negative_prompt", "seed", "size", "steps", "guidance", "strength", "model", "options"}
_REQUESTER = {"guild_id", "channel_id", "nsfw_channel"}


def job_request(kind: str, user_id: str = "u1", prompt: str = "", **fields: Any):
    """A JobRequest from flat keywords, as a front end would build it: parameters, where the
    requester is, and the request's own fields (source_job_id, image, mask, aspect, group)."""
    from bot.core.models import GenerationParams, JobRequest, Kind, Requester

    params = GenerationParams(prompt=prompt, **{k: fields.pop(k) for k in _PARAMS & fields.keys()})
    requester = Requester(user_id, **{k: fields.pop(k) for k in _REQUESTER & fields.keys()})
    return JobRequest(Kind(kind), requester, params, **fields)


def generation_request(kind: str = "imagine", *, model: str, prompt: str = "", width: int = 64,
                       height: int = 64, source_image: bytes | None = None,
                       mask_image: bytes | None = None, upscale_factor: int = 2, **params: Any):
    """A GenerationRequest as the planner makes it: resolved size and model."""
    from bot.core.models import GenerationParams, GenerationRequest, Kind

    return GenerationRequest(
        Kind(kind), GenerationParams(prompt=prompt, model=model, size=(width, height), **params),
        source_image=source_image, mask_image=mask_image, upscale_factor=upscale_factor)


def start_app(settings, generators=None, image_screen=None, queue_limits=None):
    """The app as a front end starts it: wired by bootstrap, then recovered."""
    from bot.bootstrap import Overrides, bootstrap

    app = bootstrap(settings, Overrides(generators=generators, image_screen=image_screen,
                                        queue_limits=queue_limits or {}))
    app.recover()
    return app


def pixels(source) -> str:
    """The sha256 of an image's decoded RGBA pixels (and size), from a path or bytes: stored files
    carry their job's provenance, so two jobs with the same pixels differ as files."""
    import hashlib
    import io as _io

    from PIL import Image

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image = Image.open(_io.BytesIO(data)).convert("RGBA")
    return hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()


def closed_url() -> str:
    """The URL of a port on 127.0.0.1 that nothing listens on (a server that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
