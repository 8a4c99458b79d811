"""Graph passes over ONNX models that are not export targets (those are in ``gn_convert.onnx.lowering``).

- :mod:`.blocked_layout`: onnxruntime's optimised graph rewritten so that GroupNorm, the Add and
  activation after it, and squeeze-excite run on its blocked (NCHWc) layout
  (used by :mod:`gn_convert.native.nchwc`).
"""
