"""Files written so that a reader never sees half of one: a temporary name beside the target, then a rename.

A temporary file or folder starts private (``mkstemp`` 0600, ``mkdtemp`` 0700); before it takes the
target's name it gets the mode an ordinary ``open()`` / ``mkdir()`` would have given it under the
process umask (0644 / 0755 under umask 022), so colleagues, QuPath or a web server's account can
read results on a shared volume exactly as far as the user's umask allows.
"""

import os
import tempfile
from pathlib import Path


def _umask_from_proc() -> int | None:
    """The process umask from /proc (Linux): read without changing it, so safe from any thread."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """Fallback where /proc has no Umask line: os.umask can only be read by setting it, which is
    not thread-safe, so it is done once, here, while the module is imported."""
    found = _umask_from_proc()
    if found is not None:
        return found
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask now (a later ``os.umask`` call is seen where /proc tells it)."""
    found = _umask_from_proc()
    return _IMPORT_UMASK if found is None else found


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0o666) or ``mkdir()`` (0o777) gives a new file or folder under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def temp_file_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path`` (open descriptor, name), already with the umask's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, Path(tmp)


def temp_dir_beside(path: Path) -> Path:
    """A new temporary folder beside ``path``, already with the umask's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(umask_mode(directory=True))
    except BaseException:
        tmp.rmdir()
        raise
    return tmp


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place (with the umask's mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
