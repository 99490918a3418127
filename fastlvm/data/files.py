"""Files written whole: a reader sees the old file or the new one, never half of one."""

import os
import tempfile

import numpy as np


def atomic_write(path, write):
    """write(f) into a temporary file beside path (binary mode), flushed to disk, then renamed
    over path; on any error the temporary file is removed and path is left as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_savez(path, arrays):
    """np.savez of `arrays` (a dict of plain arrays), written whole (see atomic_write)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))
