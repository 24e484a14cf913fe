"""A grid of a request's images in one picture (two across, numbered left to right, top to
bottom), as Midjourney answers /imagine. CPU work: call it in a worker thread."""
from __future__ import annotations

import io

GAP = 4  # pixels between the images


def grid_png(images: list[bytes]) -> bytes:
    """The images side by side, two to a row, each at the first one's size, as a PNG."""
    from PIL import Image

    frames = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    w, h = frames[0].size
    columns = 1 if len(frames) == 1 else 2
    rows = (len(frames) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w + (columns - 1) * GAP, rows * h + (rows - 1) * GAP), (32, 34, 37))
    for i, frame in enumerate(frames):
        if frame.size != (w, h):
            frame = frame.resize((w, h))
        sheet.paste(frame, ((i % columns) * (w + GAP), (i // columns) * (h + GAP)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
