"""What the file system allows: kernel file systems that hold no files, and the mode new files get.

Used by :mod:`gn_convert.atomic` to say why a folder cannot be written (``/proc`` answers "No such
file or directory") and to give the files it renames into place the user's umask.
"""

from __future__ import annotations

import os
from pathlib import Path

VIRTUAL_FILE_SYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                                  "securityfs", "configfs", "pstore", "bpf", "mqueue", "hugetlbfs", "fusectl"})
"""Kernel file systems that expose the system as files and hold no files of their own."""


def file_system_type(path: Path) -> str | None:
    """The type of the file system ``path`` lies on (``/proc/self/mounts``), or None where unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    real = str(path.resolve())
    best: tuple[str, str | None] = ("", None)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].encode().decode("unicode_escape")  # spaces are written \040
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best[1]


def unwritable_reason(folder: Path, err: OSError) -> str:
    """Why nothing can be created under ``folder``: the file system when it is a kernel one (``/proc``
    answers "No such file or directory"), else the error's own words."""
    kind = file_system_type(folder)
    if kind in VIRTUAL_FILE_SYSTEMS:
        return f"it is on the kernel's {kind} file system, which holds no files of its own"
    return str(err.strerror or err)


def current_umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where it can be, without changing it)."""
    try:  # Linux >= 4.7
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


