"""The optional ``serve`` extra: import its packages, or say in one line how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from gn_convert.errors import ServeExtraMissingError

INSTALL_HINT = "pip install 'gn-convert[serve]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` from the serve extra.

    Args:
        module: dotted module name, e.g. ``tritonclient.grpc.model_config_pb2``.
        purpose: what needs it, for the message (``writing a Triton repository``).

    Returns:
        The imported module.

    Raises:
        ServeExtraMissingError: the module (or one it needs) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None) or module
        raise ServeExtraMissingError(
            f"{purpose} needs the serve extra ({missing} is not installed); run: {INSTALL_HINT}"
        ) from None


def model_config_pb2() -> ModuleType:
    """Triton's model-configuration protobuf module, as shipped by ``tritonclient``."""
    return require("tritonclient.grpc.model_config_pb2", "writing a Triton model repository")
