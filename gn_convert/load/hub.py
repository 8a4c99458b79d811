"""torchvision's pretrained weights, read as tensors only.

torchvision's builders read their weights through ``torch.hub.load_state_dict_from_url``, which unpickles
with ``weights_only=False`` and checks a file's hash only when it downloads it: any file placed in
``$TORCH_HOME/hub/checkpoints`` under a weights file's name would run code when the model is built.
:func:`tensors_only` makes those builds read with ``weights_only=True`` (torchvision's weights are plain
tensor dicts), and :func:`check_cached` compares a cached file with the SHA-256 prefix its name carries
(``resnet18-f37072fd.pth``), as the download does.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gn_convert.errors import WeightsError

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.[A-Za-z]+$")
"""The hash prefix in a torchvision weights file's name (``torch.hub``'s convention)."""


@contextlib.contextmanager
def tensors_only() -> Iterator[None]:
    """While open, torchvision's weights (``WeightsEnum.get_state_dict``) load with ``weights_only=True``."""
    from torchvision.models import _api

    original = _api.WeightsEnum.get_state_dict

    def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = _api.load_state_dict_from_url(self.url, *args, **{**kwargs, "weights_only": True})
        return state

    _api.WeightsEnum.get_state_dict = get_state_dict
    try:
        yield
    finally:
        _api.WeightsEnum.get_state_dict = original


def check_cached(path: Path) -> None:
    """Refuse a cached weights file whose SHA-256 does not start with the prefix in its name.

    Raises:
        WeightsError: the file was truncated or replaced.
    """
    found = HASH_IN_NAME.search(path.name)
    if found is None or not path.is_file():
        return
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(found.group(1)):
        raise WeightsError(f"the cached weights file {path} does not match the hash in its name ({found.group(1)}): "
                           "it was truncated or replaced; delete it to download it again")
