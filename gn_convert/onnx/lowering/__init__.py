"""Lowering passes over a traced model, one file per target (see :mod:`gn_convert.onnx.targets`).

Each pass is one rule with stated preconditions, applied to every ``ai.gn_convert::GroupNorm``
call of the main graph; a pass that cannot apply raises ``ValueError`` saying why.
"""
