"""A native CPU kernel for ``ai.gn_convert::GroupNorm``, registered in onnxruntime as a custom op."""

from .build import LIBRARY_NAME, build_library, session_options
from .errors import NativeBuildError
from .headers import find_headers

__all__ = ["LIBRARY_NAME", "NativeBuildError", "build_library", "find_headers", "session_options"]
