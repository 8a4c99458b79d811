"""Choices of an option read from the API's own map, imported only when argparse needs them.

Building the parser must not import torch, onnx or onnxruntime (``gn-convert --version`` and
``--help`` start in a fraction of a second), yet the CLI keeps no second list of names: a
:class:`LazyChoices` names the map (``module:attribute``) and imports it the first time argparse
checks a value against it or prints it (``gn-convert convert --help``, a bad value). Options that
use it have a ``metavar``, since argparse lists plain choices while it builds the parser, and a
default of None: the API function's own default applies unless the option is given.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import overload


class LazyChoices(Sequence[str]):
    """The keys of ``module:attribute`` (a dict or a tuple of names), plus ``extra`` names.

    Args:
        where: ``"package.module:NAME"``, the map whose keys are the valid values.
        extra: more valid values, each ``"package.module:NAME"`` of a string constant.
    """

    def __init__(self, where: str, *extra: str) -> None:
        self.where, self.extra = where, extra
        self._names: tuple[str, ...] | None = None

    @staticmethod
    def _read(where: str) -> object:
        module, _, attribute = where.partition(":")
        return getattr(importlib.import_module(module), attribute)

    @property
    def names(self) -> tuple[str, ...]:
        """The valid values, in the map's order (imported on first use)."""
        if self._names is None:
            found = self._read(self.where)
            extra = tuple(str(self._read(where)) for where in self.extra)
            self._names = (*(str(name) for name in found), *extra)  # type: ignore[attr-defined]
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self.names[index]

    def __repr__(self) -> str:
        return f"LazyChoices({self.where!r})"
