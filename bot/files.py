"""Reading a file a user named (a config file, an image to edit) safely: only a regular file (not
/dev/zero, a FIFO or a directory), and never more than a limit (plus one byte, to tell)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .core.models import size_text


class FileRefused(ValueError):
    """A file that cannot be read as asked; the message names it and says why."""


def read_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    name = str(path)
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; regular files ignore it.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileRefused(f"{name}: {what} not found") from None
    except IsADirectoryError:
        raise FileRefused(f"{name}: is a directory, not a {what}") from None
    except PermissionError:
        raise FileRefused(f"{name}: permission denied") from None
    except OSError as exc:
        raise FileRefused(f"{name}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileRefused(f"{name}: is a directory, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"{name}: not a regular file (a device, pipe or socket), so not a {what}")
        if info.st_size > limit:
            raise FileRefused(f"{name}: the {what} is {size_text(info.st_size)}; the limit is {size_text(limit)}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # it grew while being read
            raise FileRefused(f"{name}: the {what} is over the limit of {size_text(limit)}")
        return data
    except OSError as exc:
        raise FileRefused(f"{name}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
