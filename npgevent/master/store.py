"""The master's state file: every record (the API key record included) as JSON.

``<state dir>/npgevent.json`` holds ``{"format": "npgevent-master", "version": 1,
"records": [...]}`` with every field of every record, the hidden counter state
included.  Writes are atomic: a private temporary file (mode 0600) in the same
directory, ``fsync``, ``rename`` over the old file, ``fsync`` of the directory.
:meth:`StateStore.backup` copies the current file to ``npgevent.json.backup``
(the master does that every ``NP_RELOAD_INTERVAL``).

A file that cannot be read or parsed is never overwritten silently: it is
renamed to ``npgevent.json.corrupt-<timestamp>`` with an error log, the backup is
tried next, and failing that the master starts empty (with a new API key).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..log import InstanceLog
from .records import Record

FORMAT = "npgevent-master"
VERSION = 1
FILENAME = "npgevent.json"
MAX_FILE = 64 << 20  # bytes: far more than any real state, far less than memory


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "npgevent")


class StateStore:
    def __init__(self, directory: str, log: InstanceLog) -> None:
        self.dir = Path(directory).expanduser()
        self.path = self.dir / FILENAME
        self.backup_path = self.dir / (FILENAME + ".backup")
        self.log = log

    def load(self) -> list[Record]:
        """Records from the state file (or its backup); [] if there is none usable."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.dir.glob(".npgevent-*.tmp"):
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return []
        try:
            return self._read(self.path)
        except (OSError, ValueError) as exc:
            aside = self.path.with_name("%s.corrupt-%s" % (FILENAME, time.strftime("%Y%m%d-%H%M%S")))
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = self.path
            self.log.error("State file %s is unreadable (%s): moved to %s", self.path, _short(exc), aside)
        if self.backup_path.exists():
            try:
                records = self._read(self.backup_path)
                self.log.warn("Loaded the backup %s instead", self.backup_path)
                return records
            except (OSError, ValueError) as exc:
                self.log.error("State backup %s is unreadable too (%s)", self.backup_path, _short(exc))
        return []

    def _read(self, path: Path) -> list[Record]:
        """The records of *path*.  ValueError (or OSError) when the file as a whole cannot be
        used; a record that cannot be used is skipped with an ERROR naming it."""
        if path.stat().st_size > MAX_FILE:
            raise ValueError("larger than %d MiB" % (MAX_FILE >> 20))
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except RecursionError:
                raise ValueError("nested too deep") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not an npgevent master state file")
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError("version %.40r is not a whole number" % (version,))
        if version > VERSION:
            raise ValueError("state file version %s is newer than this npgevent" % version)
        items = data.get("records")
        if not isinstance(items, list):
            raise ValueError("records is not a list")
        records: list[Record] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            name = item.get("id") if isinstance(item, dict) else None
            label = "%d (id %.40r)" % (index, name) if isinstance(name, str) else "%d" % index
            try:
                rec = Record.from_state(item)
                if rec.id in seen:
                    raise ValueError("duplicate id")
            except ValueError as exc:
                self.log.error("State file %s: record %s skipped: %s", path, label, _short(exc))
                continue
            seen.add(rec.id)
            records.append(rec)
        return records

    def save(self, records: list[Record]) -> None:
        """Write atomically; an error is logged, never raised (the API keeps working).  No content
        can make it fail: text that UTF-8 cannot hold is written as U+FFFD."""
        try:
            text = json.dumps({"format": FORMAT, "version": VERSION,
                               "records": [r.to_state() for r in records]}, indent=1, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:  # a bug: keep the old file, say so
            self.log.error("Cannot save state to %s: %s", self.path, _short(exc))
            return
        payload = text.encode("utf-8", "replace")
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".npgevent-", suffix=".tmp", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._fsync_dir()
        except OSError as exc:
            self.log.error("Cannot save state to %s: %s", self.path, exc.strerror or exc)

    def backup(self) -> bool:
        try:
            if self.path.exists():
                shutil.copy2(self.path, self.backup_path)
                os.chmod(self.backup_path, 0o600)
                return True
        except OSError as exc:
            self.log.error("Cannot write state backup %s: %s", self.backup_path, exc.strerror or exc)
        return False

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."

