"""Class names for a served classifier: from a text file, or from a gn-convert checkpoint.

A checkpoint written by ``gn-convert MODEL`` records the source weights' category names in its
``config.json`` (``categories``); an exported ``model.onnx`` in that folder finds them there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gn_convert.errors import CheckpointError, DeployError
from gn_convert.surgery.checkpoint import CONFIG_FILE, read_config

log = logging.getLogger(__name__)


def read_labels(source: str | Path) -> list[str]:
    """Class names from ``source``: a text file (one a line) or a gn-convert checkpoint folder.

    Raises:
        DeployError: the file cannot be read, is empty, or the checkpoint records no categories.
    """
    source = Path(source)
    if source.is_dir():
        try:
            categories = read_config(source).get("categories")
        except CheckpointError as err:
            raise DeployError(str(err)) from None
        if not categories:
            raise DeployError(f"{source / CONFIG_FILE} records no category names (untrained or local "
                              "weights); pass a labels file, one name a line")
        return [str(c) for c in categories]
    try:
        labels = [line.strip() for line in source.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DeployError(f"cannot read labels from {source}: {err}") from None
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise DeployError(f"{source} holds no labels; give one class name a line")
    return labels


def labels_beside(onnx_path: str | Path) -> list[str] | None:
    """The categories of the gn-convert checkpoint ``onnx_path`` lies in, or None."""
    folder = Path(onnx_path).absolute().parent
    if not (folder / CONFIG_FILE).is_file():
        return None
    try:
        categories = read_config(folder).get("categories")
    except CheckpointError:
        return None
    if categories:
        log.info("using %d category names from %s", len(categories), folder / CONFIG_FILE)
    return [str(c) for c in categories] if categories else None
