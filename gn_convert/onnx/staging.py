"""Write an artifact beside its destination first, then move it into place.

An ONNX artifact is one file, or a model file plus its external-data file. Both are written
into a hidden folder in the destination's own folder (same file system), checked there, and
moved into place with ``os.replace`` only when everything succeeded. On failure the folder
and everything in it is removed, as are parent folders this created, so no partial file is
left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from ..errors import OutputError


class Staging:
    """A context manager that stages the files of one artifact.

    Usage::

        with Staging(Path("out/model.onnx")) as stage:
            write(stage.path)          # and any side files in stage.folder
            files = stage.commit()     # moved into out/

    Args:
        destination: the final path of the main file.

    Raises:
        OutputError: when the destination's folder cannot be created or written, or the
            destination is a folder.
    """

    def __init__(self, destination: Path) -> None:
        self.destination = Path(destination)
        self.folder: Path | None = None
        self._created: list[Path] = []

    @property
    def path(self) -> Path:
        """Where to write the main file while staging."""
        if self.folder is None:
            raise RuntimeError("Staging used outside its with-block")
        return self.folder / self.destination.name

    def __enter__(self) -> "Staging":
        if self.destination.is_dir():
            raise OutputError(f"cannot write {self.destination}: it is a folder; give a file path such as model.onnx")
        try:
            self._make_parents(self.destination.parent)
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.", suffix=".partial",
                                                dir=self.destination.parent))
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"cannot write {self.destination}: {exc.strerror or exc}; choose a writable folder") from None
        return self

    def _make_parents(self, parent: Path) -> None:
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created.append(folder)

    def commit(self) -> list[Path]:
        """Move every staged file into the destination's folder, the main file last.

        Returns:
            The final paths, the main file first.

        Raises:
            OutputError: when a file cannot be moved into place (files already moved are
                removed again).
        """
        staged = sorted(self.path.parent.iterdir(), key=lambda p: p.name == self.destination.name)
        moved: list[Path] = []
        for source in staged:
            target = self.destination.parent / source.name
            try:
                os.replace(source, target)
            except OSError as exc:
                for path in moved:
                    path.unlink(missing_ok=True)
                raise OutputError(f"cannot move {source.name} into {self.destination.parent}: "
                                  f"{exc.strerror or exc}") from None
            moved.append(target)
        return moved[-1:] + moved[:-1]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if exc_type is not None:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created.clear()
