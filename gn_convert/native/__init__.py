"""A native CPU kernel for ``ai.gn_convert::GroupNorm``, registered in onnxruntime as a custom op.

:func:`build_library` compiles it (cached); :func:`resolve_library` picks the library to use or
ship; :func:`gn_convert.runtime.open_session` registers it (``library=``) and, where the CPU has
onnxruntime's blocked layout, runs the GroupNorms on it (:func:`nchwc_model`).
"""

from gn_convert.native.build import LIBRARY_NAME, PORTABLE_MARCH, build_library, resolve_library
from gn_convert.native.headers import find_headers
from gn_convert.native.nchwc import nchwc_model

__all__ = ["LIBRARY_NAME", "PORTABLE_MARCH", "build_library", "find_headers", "nchwc_model", "resolve_library"]
