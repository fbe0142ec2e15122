"""The project's one atomic file writer: a temp file beside the target, fsync, rename, fsync the folder.

In the drop-in package (``library/hina``) so that everything that writes a file can use it: the standalone
trainer (``library/hina_train/saving.atomic_write`` adds the full-disk message on top), the benchmarks, and
``networks/lokr.py``, which is copied into sd-scripts next to ``library/hina`` and so may import only from it.

Temp names start with a dot and carry ``.tmp`` (``.NAME.<random>.tmp.EXT``, keeping the extension, since
writers such as kohya's ``save_weights`` choose the format by it), so a later run can recognise and remove
what a killed one left (``is_temp_name``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

TEMP_MARK = ".tmp"


def is_temp_name(name: str) -> bool:
    """A temp file or folder name made by this module (or by the trainer's state saver)."""
    return name.startswith(".") and (name.endswith(TEMP_MARK) or f"{TEMP_MARK}." in name)


def write_atomic(path: str | Path, write: Callable[[str], None], mode: int = 0o644) -> None:
    """Call ``write(tmp_path)``, fsync the temp file, rename it onto ``path``, fsync the folder.

    On any failure (including KeyboardInterrupt/SystemExit) the temp file is removed and ``path`` keeps its
    previous content; the exception propagates, an OSError carrying ``partial_bytes`` (what had been written).
    The file gets ``mode`` minus the umask (mkstemp would leave it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{TEMP_MARK}{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError):
            try:
                e.partial_bytes = os.path.getsize(tmp)
            except OSError:
                e.partial_bytes = 0
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a platform that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
