"""Provenance in every stored image: its job's fields as metadata (PNG text chunks; XMP in PNG,
JPEG and WebP) with the IPTC digital source type, and, with a certificate, a signed C2PA manifest.

Metadata is spliced into the file's own chunks and segments, never re-encoded, so the pixels (and
the compressed image data) stay exactly as made. cryptography and c2pa-python (the provenance
extra) are imported only when a certificate is configured or a manifest is read.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as _dist
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from bot.core.models import JobRecord, Kind

from .errors import StorageError

IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED = IPTC_SOURCE_TYPES + "trainedAlgorithmicMedia"
# An edit (inpainting, outpainting) keeps pixels of its source beside generated ones.
COMPOSITE = IPTC_SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"
UNSIGNED_REASON = "images are not signed: no [provenance] cert_chain/private_key"
VALID, UNTRUSTED, NO_MANIFEST = "valid", "valid (untrusted: signed by a private CA)", "no manifest"
MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
EASEL_NS = "urn:easel:xmp:1.0/"  # easel's own XMP properties: easel:job, easel:seed, ...
_IPTC_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_XMP_KEY = "XML:com.adobe.xmp"  # the PNG iTXt keyword of an XMP packet
_MAX_PEM_BYTES = 1 << 20


def _installed_version() -> str:
    try:
        return _dist.version("easel")
    except _dist.PackageNotFoundError:
        return "0.0.0"


EASEL_VERSION = _installed_version()


def image_format(data: bytes) -> str:
    """"png", "jpg" or "webp", from the bytes; ValueError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("not a PNG, JPEG or WebP image")


def digital_source_type(job: JobRecord) -> str:
    return COMPOSITE if job.kind == Kind.EDIT else TRAINED


# ---- the fields -----------------------------------------------------------------------------

# Characters XML 1.0 cannot hold (most control characters); shown as U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_CR = {"\r": "&#13;"}  # XML parsers turn a bare CR into LF


def job_fields(job: JobRecord, software: str) -> dict[str, str]:
    """What the file says about how it was made, in a fixed order; unset values are left out."""
    p = job.params
    values: dict[str, object] = {
        "job": job.id, "kind": job.kind, "prompt": p.prompt, "negative_prompt": p.negative_prompt,
        "original_prompt": job.original_prompt, "seed": p.seed, "model": p.model,
        "provider": job.provider, "size": f"{p.size[0]}x{p.size[1]}" if p.size else None,
        "steps": p.steps, "guidance": p.guidance, "strength": p.strength,
        "options": ", ".join(f"{k}={v}" for k, v in sorted(p.options.items())),
        "source_job": job.source_job_id, "outpaint": job.outpaint,
        "digital_source_type": digital_source_type(job), "software": software,
    }
    return {k: _NOT_XML.sub("\ufffd", str(v)) for k, v in values.items() if v is not None and v != ""}


def a1111_parameters(fields: Mapping[str, str]) -> str:
    """The "parameters" text that Automatic1111-style tools (and civitai) read."""
    lines = [fields.get("prompt", "")]
    if "negative_prompt" in fields:
        lines.append(f"Negative prompt: {fields['negative_prompt']}")
    options = dict(o.split("=", 1) for o in fields.get("options", "").split(", ") if "=" in o)
    pairs = [("Steps", fields.get("steps")), ("Sampler", options.get("sampler")),
             ("CFG scale", fields.get("guidance")), ("Seed", fields.get("seed")),
             ("Size", fields.get("size")), ("Model", fields.get("model")),
             ("Denoising strength", fields.get("strength")), ("easel job", fields.get("job"))]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def xmp_packet(fields: Mapping[str, str], *, max_bytes: int | None = None) -> bytes:
    """An XMP packet with the IPTC digital source type, the creator tool and easel's fields.
    Over `max_bytes` (a JPEG segment's room), long texts are shortened: the job record has them."""
    body = "".join(f"   <easel:{k}>{escape(v, _CR)}</easel:{k}>\n" for k, v in fields.items())
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{_IPTC_NS}"\n'
        f'    xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:easel="{EASEL_NS}">\n'
        f"   <Iptc4xmpExt:DigitalSourceType>{escape(fields['digital_source_type'])}"
        "</Iptc4xmpExt:DigitalSourceType>\n"
        f"   <xmp:CreatorTool>{escape(fields['software'])}</xmp:CreatorTool>\n"
        f"{body}  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()
    if max_bytes is not None and len(packet) > max_bytes:
        short = {k: v if len(v) <= 1000 else v[:1000] + "\u2026" for k, v in fields.items()}
        return xmp_packet(short)
    return packet


def read_xmp(packet: bytes) -> dict[str, str]:
    """easel's fields and the digital source type from an XMP packet ({} if it does not parse)."""
    try:
        root = ElementTree.fromstring(packet.decode("utf-8", "replace").lstrip("\ufeff"))
    except ElementTree.ParseError:
        return {}
    fields: dict[str, str] = {}
    for node in root.iter():
        # Properties may be elements or attributes of rdf:Description, as writers choose.
        pairs = [(node.tag, node.text or "")] + list(node.attrib.items())
        for name, value in pairs:
            if name == f"{{{_IPTC_NS}}}DigitalSourceType":
                fields["digital_source_type"] = value.strip()
            elif name.startswith(f"{{{EASEL_NS}}}"):
                fields[name[len(EASEL_NS) + 2:]] = value
    return fields


# ---- PNG ------------------------------------------------------------------------------------

_OUR_PNG_KEYS = re.compile(rb"^(parameters|easel:[a-z_]+|XML:com\.adobe\.xmp)$")


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk, its length and CRC included, up to IEND."""
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            break
        chunks.append((kind, pos, end))
        pos = end
        if kind == b"IEND":
            return chunks if chunks[0][0] == b"IHDR" else _bad("PNG", "does not start with IHDR")
    return _bad("PNG", "is truncated (no IEND chunk)")


def _bad(what: str, why: str) -> Any:
    raise ValueError(f"a damaged {what}: it {why}")


def _itxt(keyword: str, text: str) -> bytes:
    body = keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))


def _png_text(data: bytes, start: int, end: int) -> tuple[bytes, str | None]:
    """(keyword, text) of a tEXt or uncompressed iTXt chunk; text None for a compressed one."""
    body = data[start + 8:end - 4]
    keyword, _, rest = body.partition(b"\0")
    if data[start + 4:start + 8] == b"tEXt":
        return keyword, rest.decode("latin-1")
    if rest[:1] != b"\0":
        return keyword, None
    parts = rest[2:].split(b"\0", 2)
    return keyword, parts[2].decode("utf-8", "replace") if len(parts) == 3 else None


def _png_embed(data: bytes, fields: Mapping[str, str]) -> bytes:
    """Our iTXt chunks right after IHDR; earlier ones with the same keywords are dropped."""
    chunks = _png_chunks(data)
    texts = [("parameters", a1111_parameters(fields))]
    texts += [(f"easel:{k}", v) for k, v in fields.items()]
    texts.append((_XMP_KEY, xmp_packet(fields).decode()))
    out = [data[:chunks[0][2]], *(_itxt(k, v) for k, v in texts)]
    for kind, start, end in chunks[1:]:
        if kind in (b"tEXt", b"iTXt", b"zTXt") and _OUR_PNG_KEYS.match(_png_text(data, start, end)[0]):
            continue
        out.append(data[start:end])
    return b"".join(out)


def _png_metadata(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for kind, start, end in _png_chunks(data):
        if kind not in (b"tEXt", b"iTXt"):
            continue
        keyword, text = _png_text(data, start, end)
        if text is None:
            continue
        if keyword == _XMP_KEY.encode():
            fields = {**read_xmp(text.encode()), **fields}
        elif keyword.startswith(b"easel:") or keyword == b"parameters":
            fields[keyword.decode("latin-1").removeprefix("easel:")] = text
    return fields


# ---- JPEG -----------------------------------------------------------------------------------

_XMP_SIG = b"http://ns.adobe.com/xap/1.0/\0"
_APP0, _APP1, _APP11, _SOS, _EOI = 0xE0, 0xE1, 0xEB, 0xDA, 0xD9
_JPEG_XMP_ROOM = 65533 - len(_XMP_SIG)


def _jpeg_segments(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """(marker, start, end) of each segment before the image data, and where that data starts."""
    segments, pos = [], 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            _bad("JPEG", "has no marker where one should be")
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in (_SOS, _EOI):
            return segments, pos
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            segments.append((marker, pos, pos + 2))
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > len(data) or end < pos + 4:
            break
        segments.append((marker, pos, end))
        pos = end
    return _bad("JPEG", "is truncated")


def _is_xmp(data: bytes, marker: int, start: int) -> bool:
    return marker == _APP1 and data[start + 4:start + 4 + len(_XMP_SIG)] == _XMP_SIG


def _jpeg_embed(data: bytes, fields: Mapping[str, str]) -> bytes:
    """Our XMP segment after the leading JFIF/Exif segments; an earlier XMP segment is dropped."""
    segments, scan = _jpeg_segments(data)
    payload = _XMP_SIG + xmp_packet(fields, max_bytes=_JPEG_XMP_ROOM)
    ours = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    lead = 0
    while lead < len(segments) and segments[lead][0] in (_APP0, _APP1) and not _is_xmp(data, *segments[lead][:2]):
        lead += 1
    kept = [data[s:e] for i, (m, s, e) in enumerate(segments) if i < lead or not _is_xmp(data, m, s)]
    return b"".join([data[:2], *kept[:lead], ours, *kept[lead:], data[scan:]])


def _jpeg_metadata(data: bytes) -> dict[str, str]:
    for marker, start, end in _jpeg_segments(data)[0]:
        if _is_xmp(data, marker, start):
            return read_xmp(data[start + 4 + len(_XMP_SIG):end])
    return {}


# ---- WebP -----------------------------------------------------------------------------------

_XMP_FLAG, _ALPHA_FLAG = 0x04, 0x10


def _webp_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(fourcc, start, end) of each chunk, padding included."""
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data):
        _bad("WebP", "is truncated")
    chunks, pos = [], 12
    while pos + 8 <= riff_end:
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        end = min(pos + 8 + size + (size & 1), riff_end)
        if pos + 8 + size > riff_end:
            _bad("WebP", "is truncated")
        chunks.append((data[pos:pos + 4], pos, end))
        pos = end
    return chunks or _bad("WebP", "holds no image")


def _vp8x_for(data: bytes, kind: bytes, start: int) -> bytes:
    """The VP8X header chunk that a simple (VP8 or VP8L) WebP needs before it can hold XMP."""
    body = data[start + 8:start + 18]
    if kind == b"VP8 " and len(body) == 10:
        width, height, flags = (int.from_bytes(body[6:8], "little") & 0x3FFF,
                                int.from_bytes(body[8:10], "little") & 0x3FFF, 0)
    elif kind == b"VP8L" and body[:1] == b"\x2f":
        bits = int.from_bytes(body[1:5], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        flags = _ALPHA_FLAG if bits >> 28 & 1 else 0
    else:
        return _bad("WebP", f"starts with an unknown chunk {kind!r}")
    body = bytes([flags | _XMP_FLAG, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"VP8X" + struct.pack("<I", len(body)) + body


def _webp_embed(data: bytes, fields: Mapping[str, str]) -> bytes:
    """An "XMP " chunk at the end (after any EXIF), with the VP8X header saying so."""
    chunks = _webp_chunks(data)
    kind, start, end = chunks[0]
    if kind == b"VP8X":
        head = data[start:start + 8] + bytes([data[start + 8] | _XMP_FLAG]) + data[start + 9:end]
        rest = chunks[1:]
    else:
        head, rest = _vp8x_for(data, kind, start), chunks
    packet = xmp_packet(fields)
    xmp = b"XMP " + struct.pack("<I", len(packet)) + packet + b"\0" * (len(packet) & 1)
    body = b"".join([head, *(data[s:e] for k, s, e in rest if k != b"XMP "), xmp])
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def _webp_metadata(data: bytes) -> dict[str, str]:
    for kind, start, _ in _webp_chunks(data):
        if kind == b"XMP ":
            size = int.from_bytes(data[start + 4:start + 8], "little")
            return read_xmp(data[start + 8:start + 8 + size])
    return {}


# ---- the whole file -------------------------------------------------------------------------


def embed_metadata(data: bytes, fields: Mapping[str, str]) -> bytes:
    """`data` with `fields` embedded; its image data untouched."""
    embed = {"png": _png_embed, "jpg": _jpeg_embed, "webp": _webp_embed}[image_format(data)]
    return embed(data, fields)


def read_metadata(data: bytes) -> dict[str, str]:
    read = {"png": _png_metadata, "jpg": _jpeg_metadata, "webp": _webp_metadata}[image_format(data)]
    return read(data)


def carries_manifest(data: bytes) -> bool:
    """Whether the file embeds a C2PA manifest store (PNG caBX, JPEG APP11 JUMBF, WebP C2PA)."""
    fmt = image_format(data)
    if fmt == "png":
        return any(kind == b"caBX" for kind, _, _ in _png_chunks(data))
    if fmt == "webp":
        return any(kind == b"C2PA" for kind, _, _ in _webp_chunks(data))
    return any(m == _APP11 and data[s + 4:s + 6] == b"JP" and b"c2pa" in data[s:min(e, s + 64)]
               for m, s, e in _jpeg_segments(data)[0])


# ---- reading provenance back ----------------------------------------------------------------


@dataclass(frozen=True)
class ProvenanceReport:
    """What a file says about itself: its metadata fields, its C2PA manifest store (as c2pa
    reads it) and the validation state: VALID, UNTRUSTED, "invalid: ..." or NO_MANIFEST."""

    format: str
    metadata: Mapping[str, str]
    manifest_store: Mapping[str, Any] | None
    validation: str

    @property
    def valid(self) -> bool:
        return self.validation in (VALID, UNTRUSTED)

    @property
    def active_manifest(self) -> Mapping[str, Any] | None:
        store = self.manifest_store or {}
        return (store.get("manifests") or {}).get(store.get("active_manifest"))


def read_provenance(data: bytes) -> ProvenanceReport:
    """Blocking. ValueError for bytes that are not a PNG, JPEG or WebP image; StorageError when
    a manifest is there but c2pa-python (the provenance extra) is not installed."""
    fmt, fields = image_format(data), read_metadata(data)
    if not carries_manifest(data):
        return ProvenanceReport(fmt, fields, None, NO_MANIFEST)
    c2pa = _import_c2pa("reading a C2PA manifest")
    try:
        with c2pa.Reader(MIME[fmt], io.BytesIO(data)) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        return ProvenanceReport(fmt, fields, None, f"invalid: the manifest cannot be read ({_one_line(exc)})")
    return ProvenanceReport(fmt, fields, store, validation_state(store))


def validation_state(store: Mapping[str, Any]) -> str:
    """One phrase for a manifest store's validation. c2pa says "Trusted" only for a signer on a
    trust list; "Valid" with signingCredential.untrusted is a sound signature by a private CA."""
    statuses = store.get("validation_status") or []
    failures = [s for s in statuses if s.get("code") != "signingCredential.untrusted"]
    state = store.get("validation_state")
    if state == "Trusted":
        return VALID
    if state == "Valid" or (state is None and not failures):
        return UNTRUSTED if len(failures) < len(statuses) else VALID
    reasons = "; ".join(f"{s.get('explanation') or s.get('code')} ({s.get('code')})" for s in failures)
    return f"invalid: {reasons or state}"


def ingredient_validation(ingredient: Mapping[str, Any]) -> str:
    """The validation phrase of an ingredient's own manifest, as c2pa checked it when it was added."""
    if not ingredient.get("active_manifest"):
        return NO_MANIFEST
    results = (ingredient.get("validation_results") or {}).get("activeManifest") or {}
    return validation_state({"validation_status": results.get("failure") or []})


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _import_c2pa(what: str) -> Any:
    try:
        import c2pa
    except ImportError:
        raise StorageError(f"{what} needs c2pa-python: pip install 'easel[provenance]'") from None
    return c2pa


# ---- signing --------------------------------------------------------------------------------


def _read_pem(path: Path, setting: str) -> bytes:
    """A small regular file, or StorageError naming the setting and the path (never the contents)."""
    where = f"[provenance] {setting} {path}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_PEM_BYTES:
            raise StorageError(f"{where}: not a PEM file (a regular file of at most 1 MiB)")
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{where}: file not found") from None
    except OSError as exc:
        raise StorageError(f"{where}: cannot read it ({exc.strerror})") from None


def _load_credentials(cert_chain: Path, private_key: Path) -> tuple[bytes, bytes, str]:
    """(chain PEM, key PEM, c2pa algorithm), checked: both parse, the key is the leaf's, the leaf
    is within its validity."""
    import datetime

    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    chain_pem, key_pem = _read_pem(cert_chain, "cert_chain"), _read_pem(private_key, "private_key")
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        raise StorageError(f"[provenance] cert_chain {cert_chain}: not a PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise StorageError(f"[provenance] private_key {private_key}: the key is encrypted; "
                           "easel needs it unencrypted (keep the file readable only by easel)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise StorageError(f"[provenance] private_key {private_key}: not a PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise StorageError(f"[provenance] private_key {private_key} is not the key of the first "
                           f"certificate in cert_chain {cert_chain}")
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise StorageError(f"[provenance] cert_chain {cert_chain}: the certificate is valid from "
                           f"{leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d}, not now")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGS:
        return chain_pem, key_pem, _EC_ALGS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return chain_pem, key_pem, "ED25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return chain_pem, key_pem, "PS256"
    raise StorageError(f"[provenance] private_key {private_key}: C2PA signs with EC P-256/384/521, "
                       "Ed25519 or RSA keys, not this kind")


_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PROFILE = ("the leaf certificate needs digitalSignature key usage, an extended key usage such as "
            "emailProtection, and subject and authority key identifiers")
_TRIAL_PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
              b"\x00\x00\x00\nIDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf\xa4q\x00\x00\x00\x00IEND\xaeB`\x82")


class Provenance:
    """Stamps every stored image: metadata always, a signed C2PA manifest with a certificate.
    Certificate or key problems raise StorageError here, at start-up, naming the file."""

    def __init__(self, cert_chain: Path | None = None, private_key: Path | None = None, *,
                 app_name: str = "easel", app_version: str = EASEL_VERSION):
        self.app_name, self.app_version = app_name, app_version
        self._c2pa: Any = None
        self._signer: Any = None
        self._context: Any = None
        self._lock = threading.Lock()  # one signature at a time: c2pa's signer is shared
        if cert_chain is None and private_key is None:
            return
        if cert_chain is None or private_key is None:
            missing = "cert_chain" if cert_chain is None else "private_key"
            raise StorageError(f"[provenance] {missing} is not set: signing needs both cert_chain "
                               "and private_key (neither: images are not signed)")
        self._c2pa = _import_c2pa("signing images ([provenance] cert_chain)")
        chain_pem, key_pem, alg = _load_credentials(Path(cert_chain), Path(private_key))
        c2pa = self._c2pa
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain_pem, key_pem, None))
            # No thumbnails: the image is stored beside its manifest, and a PNG thumbnail of a
            # detailed image can be as large as the image (and takes 30x the signing time).
            self._context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
            self._sign(_TRIAL_PNG, "png", {"actions": [_created(TRAINED, "trial")]}, [])
        except (c2pa.C2paError, StorageError) as exc:
            raise StorageError(f"[provenance] cert_chain {cert_chain}: c2pa cannot sign with it "
                               f"({_one_line(exc)}); {_PROFILE}") from None

    def unsigned_reason(self) -> str | None:
        """None when signing; else a sentence for the start-up log."""
        return None if self._signer is not None else UNSIGNED_REASON

    def stamp(self, data: bytes, job: JobRecord, *, source: bytes | None = None) -> bytes:
        """The stored file's bytes: metadata embedded, then (with a certificate) a signed C2PA
        manifest. Blocking; the core calls it in a worker thread. `data` is PNG, JPEG or WebP
        (ValueError otherwise); `source`, the input image of an edit, variation, upscale or
        outpaint, becomes the parent ingredient, its own manifest kept when it has one. A
        provider's own manifest in `data` is kept as an ingredient too; unsigned, such a file is
        stored as it came, since metadata would break that manifest's hash."""
        generated = data if carries_manifest(data) else None
        if generated is not None and self._signer is None:
            return data
        fields = job_fields(job, f"{self.app_name} {self.app_version}")
        stamped = embed_metadata(data, fields)
        if self._signer is None:
            return stamped
        agent = job.model or job.provider or "unknown model"
        actions, ingredients = [_created(fields["digital_source_type"], agent)], []
        if source is not None:
            ingredients.append(({"title": f"the source image of job {job.id}", "relationship": "parentOf",
                                 "label": "source"}, source))
            actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["source"]}},
                       {**_created(fields["digital_source_type"], agent), "action": "c2pa.edited",
                        "description": _edit_description(job)}]
        if generated is not None:
            ingredients.append(({"title": f"the image as {job.provider or agent} made it",
                                 "relationship": "componentOf", "label": "generated"}, generated))
            actions.append({"action": "c2pa.placed", "parameters": {"ingredientIds": ["generated"]}})
        try:
            return self._sign(stamped, image_format(data), {"actions": actions}, ingredients,
                              title=f"{self.app_name} job {job.id}")
        except self._c2pa.C2paError as exc:
            raise StorageError(f"C2PA signing failed for job {job.id}: {_one_line(exc)}") from None

    def _sign(self, data: bytes, fmt: str, actions: dict, ingredients: list, *, title: str = "") -> bytes:
        """`data` with a manifest of `actions` and `ingredients` ((definition, image bytes) pairs)
        signed in. An ingredient c2pa cannot read (not an image it knows, a broken manifest) is
        named in the manifest without its bytes, so the edit is still recorded."""
        c2pa = self._c2pa
        named: list[dict] = []
        while True:
            manifest = {"claim_generator_info": [{"name": self.app_name, "version": self.app_version}],
                        "title": title or self.app_name, "format": MIME[fmt], "ingredients": named,
                        "assertions": [{"label": "c2pa.actions", "data": actions}]}
            out, failed = io.BytesIO(), None
            with self._lock, c2pa.Builder(manifest, self._context) as builder:
                for definition, image in ingredients:
                    if any(n["label"] == definition["label"] for n in named):
                        continue
                    try:
                        builder.add_ingredient(definition, MIME[image_format(image)], io.BytesIO(image))
                    except (ValueError, c2pa.C2paError):
                        failed = definition
                        break
                else:
                    builder.sign(self._signer, MIME[fmt], io.BytesIO(data), out)
                    return out.getvalue()
            named.append({**failed, "format": "application/octet-stream"})


def _created(source_type: str, agent: str) -> dict[str, Any]:
    return {"action": "c2pa.created", "digitalSourceType": source_type, "softwareAgent": {"name": agent}}


def _edit_description(job: JobRecord) -> str:
    what = f"outpainting ({job.outpaint})" if job.outpaint else str(job.kind)
    return f"{what} of job {job.source_job_id}" if job.source_job_id else f"{what} of an uploaded image"
