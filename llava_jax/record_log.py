"""Resumable work's output folder: records appended one JSON line at a time and flushed as
they come, read back on a rerun (a last line cut short by a kill is removed: its work is done
again), a lock so two processes never write one folder, and files replaced atomically.
The LLaVA-Bench judge and the instruction-data generator keep their records this way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from llava_jax.errors import InputError
from llava_jax.json_input import JSONInputError, loads

log = logging.getLogger(__name__)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: str, text: str) -> None:
    """`path` holds `text` whole, or what it held before (never half of it)."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def dumps_line(record: dict[str, Any]) -> str:
    """One JSONL line: non-ASCII kept as it is, lone surrogates escaped (never invalid UTF-8)."""
    return (
        json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace").decode() + "\n"
    )


def read_appended(
    path: str, error: type[InputError], require: str, again: str
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of an appended file (none: no file). A last
    line cut short (the program killed while writing it) is removed from the file. A line
    that is not a JSON object with key `require` raises `error` naming `path:line`; `again`
    says what removing it does ("its question is judged again")."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropped a last line cut short; %s", path, again)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    records = []
    for number, line in enumerate(data.decode("utf-8", "replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except JSONInputError as err:
            raise error(
                f"{path}:{number}: {err} (a damaged record: remove the line; {again})"
            ) from None
        if not isinstance(obj, dict) or require not in obj:
            raise error(f"{path}:{number}: not a record of this program (no {require!r})")
        records.append((number, obj))
    return records


class Appender:
    """Appends records to files, each flushed as written (a kill keeps every whole line)."""

    def __init__(self, dumps: Callable[[dict[str, Any]], str] = dumps_line) -> None:
        self.dumps = dumps  # a record as one newline-terminated line
        self._files: dict[str, Any] = {}

    def append(self, path: str, record: dict[str, Any]) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        f.write(self.dumps(record))
        f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class FolderLock:
    """Holds `folder` (made if absent) for one process: a second is refused by name."""

    def __init__(self, folder: str, lock_name: str, flag: str, who: str, error: type[InputError]):
        self.folder, self.lock_name, self.flag, self.who, self.error = (
            folder, lock_name, flag, who, error,
        )  # fmt: skip
        self._lock: Any = None

    def acquire(self) -> None:
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise self.error(f"{self.flag} {self.folder} is a file; give a folder")
        try:
            os.makedirs(self.folder, exist_ok=True)
            self._lock = open(os.path.join(self.folder, self.lock_name), "a")  # noqa: SIM115
        except OSError as err:
            raise self.error(
                f"{self.flag} {self.folder}: cannot write: {err.strerror or err}"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise self.error(
                f"{self.flag} {self.folder} is in use by another {self.who} process; wait for it "
                f"to end or choose another {self.flag}"
            ) from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
