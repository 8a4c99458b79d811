"""A native CPU kernel for ``ai.gn_convert::GroupNorm``, registered in onnxruntime as a custom op.

:func:`build_library` compiles it (cached); :func:`resolve_library` picks the library to use or
ship: the one gn-convert's wheel carries (:func:`packaged_library`) before any build;
:func:`gn_convert.runtime.open_session` registers it (``library=``) and, where the CPU has onnxruntime's
blocked layout, runs the GroupNorms on it (:func:`nchwc_model`). Names are imported
on first use, so that the build (and the CLI's parser) never imports onnx or onnxruntime.
"""

from __future__ import annotations

from gn_convert._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "LIBRARY_NAME": "gn_convert.native.build",
    "PORTABLE_MARCH": "gn_convert.native.build",
    "build_library": "gn_convert.native.build",
    "packaged_library": "gn_convert.native.build",
    "resolve_library": "gn_convert.native.build",
    "find_headers": "gn_convert.native.headers",
    "nchwc_model": "gn_convert.native.nchwc",
}

__all__ = ["LIBRARY_NAME", "PORTABLE_MARCH", "build_library", "find_headers", "nchwc_model", "packaged_library",
           "resolve_library"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
