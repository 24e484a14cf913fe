"""`easel provenance verify FILE`: what an image says about how it was made (its metadata), its
C2PA manifest and whether that holds up. Exit 0: valid (trusted or not), 1: invalid or no
manifest, 2: the file cannot be read as an image."""
from __future__ import annotations

import json
from pathlib import Path

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2
MAX_IMAGE_BYTES = 512 * 2**20  # an upscaled 8K PNG is well under this

UNTRUSTED_NOTE = (
    "untrusted: the signature and the image's hash check out, but the certificate comes from a "
    "private CA that no public trust list knows, so only that CA vouches for who signed it"
)


def add_parser(sub) -> None:
    p = sub.add_parser("provenance", help="read an image's provenance: its metadata and C2PA manifest")
    actions = p.add_subparsers(dest="provenance_action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="print an image's metadata and C2PA manifest and whether it is valid "
                       "(exit 0 valid, 1 invalid or no manifest, 2 not a readable image)")
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--json", action="store_true",
                        help="print one JSON object: validation, metadata and the manifest store")


def run(settings, args) -> int:
    """`provenance verify`; `settings` is unused (a file is read, nothing is opened)."""
    from storage.errors import StorageError
    from storage.provenance import read_provenance

    from .cli import _fail
    from .files import FileRefused, read_bounded

    try:
        data = read_bounded(args.file, MAX_IMAGE_BYTES, "image")
    except FileRefused as exc:
        return _fail(str(exc), EXIT_UNREADABLE)
    try:
        report = read_provenance(data)
    except (ValueError, StorageError) as exc:
        return _fail(f"{args.file}: {exc}", EXIT_UNREADABLE)
    if args.json:
        print(json.dumps({"file": str(args.file), "format": report.format, "validation": report.validation,
                          "valid": report.valid, "metadata": dict(report.metadata),
                          "manifest_store": report.manifest_store}))
    else:
        for line in _describe(args.file, report):
            print(line)
    return EXIT_VALID if report.valid else EXIT_INVALID


def _describe(path: Path, report) -> list[str]:
    from storage.provenance import NO_MANIFEST, UNTRUSTED, ingredient_validation

    from .cli import _printable

    kind = report.format.upper().replace("JPG", "JPEG")
    if report.validation == NO_MANIFEST:
        lines = [f"{_printable(path)}: {kind}, no C2PA manifest"]
    else:
        lines = [f"{_printable(path)}: {kind} with a C2PA manifest: {_printable(report.validation)}"]
    if report.validation == UNTRUSTED:
        lines.append(f"  {UNTRUSTED_NOTE}")
    manifest = report.active_manifest or {}
    if signature := manifest.get("signature_info"):
        lines.append(f"signed by: {_printable(signature.get('common_name', '?'))} "
                     f"(issued by {_printable(signature.get('issuer', '?'))}), {signature.get('alg', '?')}")
    for tool in manifest.get("claim_generator_info") or []:
        lines.append(f"made with: {_printable(tool.get('name', '?'))} {_printable(tool.get('version', ''))}".rstrip())
    for assertion in manifest.get("assertions") or []:
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            actions = (assertion.get("data") or {}).get("actions") or []
            lines += ["action: " + _printable(_action_text(action)) for action in actions]
    for ingredient in manifest.get("ingredients") or []:
        lines.append(f"ingredient: {_printable(ingredient.get('title', '?'))} ({ingredient.get('relationship', '?')}); "
                     f"its own manifest: {_printable(ingredient_validation(ingredient))}")
    if report.metadata:
        lines.append("metadata:")
        lines += [f"  {_printable(k)}: {_printable(v)}" for k, v in report.metadata.items() if k != "parameters"]
    else:
        lines.append("metadata: none")
    return lines


def _action_text(action: dict) -> str:
    text = str(action.get("action", "?"))
    if agent := (action.get("softwareAgent") or {}).get("name"):
        text += f" by {agent}"
    if source := action.get("digitalSourceType"):
        text += f" ({str(source).rsplit('/', 1)[-1]})"
    if description := action.get("description"):
        text += f": {description}"
    return text
