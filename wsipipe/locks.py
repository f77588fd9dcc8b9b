"""One writer per output folder (a slide's, or the archive's), across threads, processes and runs.

Two archive runs over the same output folder at once must not write the same slide's
outputs together. Whoever processes a slide holds an exclusive ``flock`` on
``<slide folder>/.wsipipe.lock`` for the whole check-and-compute; the other run waits, then
finds the outputs done and skips them.

``flock`` rather than an ``O_EXCL`` marker file: the kernel drops the lock when its holder
dies (kill -9 included), so a lock is never stale and needs no PID bookkeeping. Each
acquisition opens the file anew, so two threads of one process also exclude each other
(flock locks belong to the open file, not to the process). On NFS, Linux maps flock onto
byte-range locks, which the server arbitrates between clients.

The lock file stays empty and is never removed: unlinking it could let a third run lock a
fresh inode while the second still waits on the old one.

The archive-level files (archive-results.json, archive-report.html, archive-index.json and
archive-index.html) are written under the same kind of lock on the output folder itself.

Under the lock, nobody else writes the folder, so any temporary file in it was left by a
writer that died mid-write (:func:`remove_stale_temps`). One exception: Dask tasks of a run
whose driving process died may still be running on an external cluster; removing such a
task's Zarr ``*.partial`` file only fails that orphaned task, and this run writes the chunk
itself.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".wsipipe.lock"
POLL_S = 0.2


@dataclass
class HeldLock:
    path: Path
    waited_s: float  # how long another holder kept us waiting (0.0: free at once)


@contextmanager
def folder_lock(folder: str | Path, timeout_s: float | None = None) -> Iterator[HeldLock]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Waits while another thread or process holds it (logged once); ``timeout_s`` bounds the
    wait with a :class:`TimeoutError`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        t0 = time.monotonic()
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Polling, not a blocking flock: a blocked call cannot honour a timeout and
                # would hold a thread past Ctrl-C.
                if not logged:
                    log.info("slide=%s stage=lock: another run is writing it; waiting", folder.name)
                    logged = True
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"{folder}: still locked by another run after {timeout_s:g} s") from None
                time.sleep(POLL_S)
        yield HeldLock(path, round(time.monotonic() - t0, 3))
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def is_locked(folder: str | Path) -> bool:
    """Whether some thread or process holds ``folder``'s lock now (for tests and logs)."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def stale_temps(folder: str | Path, zarr_partials: bool = True) -> list[Path]:
    """Leftovers of writers killed mid-write in a folder: ``.<name>.*.tmp`` files and
    folders (write_atomic, OME-TIFF/OME-Zarr writers), ``.<name>.old`` folders of an
    interrupted folder swap and, with ``zarr_partials``, Zarr's own ``*.partial`` chunk
    files anywhere below (a slide folder's store)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    if zarr_partials:
        found += [p for p in folder.rglob("*.partial") if p.is_file()]
    return sorted(found)


def remove_stale_temps(folder: str | Path, zarr_partials: bool = True) -> list[Path]:
    """Remove :func:`stale_temps`; call only while holding the folder's lock (a live writer's
    temporary file looks the same). Returns what was removed."""
    removed = stale_temps(folder, zarr_partials)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def clear_leftovers(slide_dir: str | Path) -> None:
    """:func:`remove_stale_temps` for a slide folder, logged; the caller holds its lock."""
    removed = remove_stale_temps(slide_dir)
    if removed:
        log.info("slide=%s stage=lock: removed %d stale temporary files", Path(slide_dir).name, len(removed))
