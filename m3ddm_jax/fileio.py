"""Atomic writes: a crash never leaves a half-written file or folder under its final name. And claims: lock
files that let processes sharing a folder split work.

A write goes to a hidden temporary beside its target, `.<name>.<host>.<pid>.<random>.part`, renamed onto the
target when complete. A process killed mid-write (SIGKILL, a lost machine) leaves it behind; the next write of
the same target removes those whose writer is known dead: same host, process gone. A temporary of another host
is left alone, since its writer may be alive (its pid means nothing here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Iterator

log = logging.getLogger(__name__)

HOST = socket.gethostname()
# A claim from another host is stale once not refreshed for this long; its holder refreshes it 4 times as often.
CLAIM_STALE_AFTER = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.{HOST}.{os.getpid()}."


def _remove_stale_temporaries(path: str) -> None:
    """Removes the temporaries of `path` (.part, and atomic_dir's .old) whose writer died on this host."""
    folder, prefix = os.path.dirname(path), f".{os.path.basename(path)}."
    for entry in os.listdir(folder):
        if not (entry.startswith(prefix) and entry.endswith((".part", ".old"))):
            continue
        fields = entry[len(prefix):].rsplit(".", 3)  # host (may hold dots), pid, random, suffix
        if len(fields) != 4 or fields[0] != HOST or not fields[1].isdigit() or _pid_alive(int(fields[1])):
            continue
        stale = os.path.join(folder, entry)
        log.info("removing %s, left by a killed writer (pid %s)", stale, fields[1])
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the result the usual umask permissions."""
    os.chmod(tmp, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".part", dir=folder)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside `path`, moved onto `path` when the block succeeds.

    An existing `path` is replaced only with `overwrite`, and only after the new folder is complete.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".part", dir=os.path.dirname(path))
    try:
        yield tmp
        _publish(tmp, 0o777)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=os.path.dirname(path))
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


@contextlib.contextmanager
def claim(path: str, *, stale_after: float = CLAIM_STALE_AFTER) -> Iterator[bool]:
    """An exclusive claim on one piece of work among processes (on one host or several) sharing a folder:
    yields True while this process holds the lock file `path` (created with O_CREAT | O_EXCL, removed on exit),
    False when another live process holds it.

    A claim whose holder died is taken over: one of this host whose process is gone, or one of another host not
    refreshed for `stale_after` seconds (a thread refreshes a held claim's time stamp). Two processes taking over
    the same stale claim at once may both do the work, which atomic outputs make harmless.
    """
    mine = {"host": HOST, "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    held = _create(path, mine)
    if not held and _stale(path, stale_after):
        log.warning("taking over %s: its holder %s is gone", path, _holder(path))
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        held = _create(path, mine)
    if not held:
        yield False
        return
    stop = threading.Event()
    refresh = threading.Thread(target=_refresh, args=(path, stop, stale_after / 4), daemon=True)
    refresh.start()
    try:
        yield True
    finally:
        stop.set()
        refresh.join()
        if _holder(path) == mine:  # not a claim another process took over meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _create(path: str, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder))
    return True


def _holder(path: str) -> dict | None:
    """The claim's holder; {} while it is being written; None once it is gone."""
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def _stale(path: str, stale_after: float) -> bool:
    holder = _holder(path)
    if holder is None:
        return True
    if holder.get("host") == HOST and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"])
    try:
        return time.time() - os.stat(path).st_mtime > stale_after
    except FileNotFoundError:
        return True


def _refresh(path: str, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        with contextlib.suppress(OSError):
            os.utime(path)
