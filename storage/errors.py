"""Storage that cannot be used as configured; the message says what is wrong with which path."""
from __future__ import annotations

from bot.core.models import StoreFailed


class StorageError(StoreFailed):
    """The database or the images folder cannot be used (not a database, a directory, read-only,
    from a newer easel...). One line, naming the path."""
