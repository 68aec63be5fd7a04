"""One SQLite file owned by one store, with its format checked on open.

A store names its format with two SQLite header fields: ``application_id`` (which store wrote
the file) and ``user_version`` (its schema version). A file with no table is new and gets the
schema; any other file must carry the store's own pair, else it is refused with one line that
names the file and the fix, instead of failing later deep in SQL (files from before versioning
carry neither, e.g. the catalog whose ``matches`` had a ``score`` column).

SQLite reports a full disk, a lock held too long, a read-only file or one it cannot open as
``sqlite3.OperationalError``, which the consume loop would take for a bug. :class:`SqliteFile`
turns them into what they mean: a full volume (``SQLITE_FULL``) or a lock another connection keeps
past the busy timeout (``SQLITE_BUSY``, ``SQLITE_LOCKED``) is :class:`~memetrace.errors.DependencyDown`
``"disk"`` (waited for); a read-only or unopenable file (``SQLITE_READONLY``, ``SQLITE_CANTOPEN``,
``SQLITE_PERM``) is :class:`~memetrace.errors.StorageDenied` (the worker stops with one line).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memetrace.errors import DependencyDown, StorageDenied

_WAIT = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_DENIED = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM})


class IncompatibleFile(Exception):
    """A store file of another format; the message is one line for the user."""


@dataclass(frozen=True)
class FileFormat:
    application_id: int  # a 32-bit tag, one per store
    version: int
    what: str  # e.g. "clusterer state": names the file's role in the error
    fix: str  # what the user does about a file of another format
    schema: str  # CREATE statements of this version


class SqliteFile:
    """A connection shared by threads (one lock), autocommit with explicit transactions, WAL."""

    def __init__(self, path: Path, fmt: FileFormat) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        with self._translated():
            self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            with self._translated():
                self._check_format(fmt)
                self.db.execute("PRAGMA journal_mode=WAL")
        except Exception:
            self.db.close()
            raise

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's disk errors as the consume loop's: see the module docstring."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            code = exc.sqlite_errorcode & 0xFF  # the primary code of an extended one
            if code in _WAIT:
                raise DependencyDown("disk", f"{self.path}: {exc}: free space on its volume, or stop the other "
                                             "process writing it; the worker resumes by itself") from exc
            if code in _DENIED:
                raise StorageDenied(f"cannot write {self.path} ({exc}): make it and its folder writable by this "
                                    "user, or point its setting at a writable volume") from exc
            raise

    def _check_format(self, fmt: FileFormat) -> None:
        app, version = (self.db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("application_id", "user_version"))
        if not self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            self.db.executescript(f"BEGIN; {fmt.schema}; PRAGMA application_id = {fmt.application_id};"
                                  f" PRAGMA user_version = {fmt.version}; COMMIT;")
        elif (app, version) != (fmt.application_id, fmt.version):
            found = ("no schema version (an older memetrace wrote it)" if app == 0
                     else f"schema version {version}" if app == fmt.application_id else "another store's data")
            raise IncompatibleFile(f"{self.path} is not a {fmt.what} of schema version {fmt.version}: it has "
                                   f"{found}; {fmt.fix}")

    def close(self) -> None:
        self.db.close()

    def write(self, sql: str, rows: Iterable[Sequence]) -> None:
        self.transaction([(sql, rows)])

    def transaction(self, statements: Iterable[tuple[str, Iterable[Sequence]]]) -> None:
        """Run each (sql, rows) with executemany, all in one transaction; nothing to write: no transaction."""
        work = [(sql, list(rows)) for sql, rows in statements]
        work = [(sql, rows) for sql, rows in work if rows]
        if not work:  # most chunks have no bad files, no re-found images: skip the transaction
            return
        with self._lock, self._translated():
            self.db.execute("BEGIN")
            try:
                for sql, rows in work:
                    self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    self.db.execute("ROLLBACK")
                raise

    def read(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock, self._translated():
            return self.db.execute(sql, args).fetchall()


class SqliteStore:
    """Base of a store kept in one :class:`SqliteFile` of the format ``FORMAT``."""

    FORMAT: ClassVar[FileFormat]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = SqliteFile(path, self.FORMAT)

    def close(self) -> None:
        self.file.close()

    def _counts(self, queries: dict[str, str]) -> dict[str, int]:
        """name -> the one number each ``SELECT COUNT(*)`` query answers."""
        return {name: int(self.file.read(sql)[0][0]) for name, sql in queries.items()}
