"""Files other processes read: written atomically, or created once by whoever comes first.

A reader must see the old file or the complete new one, never a half-written
file, even if the writer is killed mid-way: write a temp file in the same
directory, fsync it, then rename (replace) or hard-link (create once) it into
place, and fsync the directory. ``harness/files.py`` builds its JSON writer on
these; systems use ``create_once`` for machine-level caches.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(text: str, path) -> Path:
    """Replace ``path`` with ``text`` atomically; any failure removes the temp file."""
    path = Path(path)
    tmp = _durable_temp(text, path)
    try:
        os.replace(tmp, path)
    except BaseException:  # any failure, Ctrl-C included: leave no temp file behind, then re-raise
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def create_once(text: str, path) -> str:
    """Create ``path`` with ``text`` unless it exists; return what the file holds afterwards. When
    several processes race, the first to link its complete file wins and all of them read its text."""
    path = Path(path)
    if not path.exists():
        tmp = _durable_temp(text, path)
        try:
            os.link(tmp, path)
            _fsync_dir(path.parent)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text(encoding="utf-8")


def _durable_temp(text: str, path: Path) -> Path:
    """A complete, fsynced temp file beside ``path`` (removed again if writing it fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; nothing more to do
        pass
    finally:
        os.close(fd)
