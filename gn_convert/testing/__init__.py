"""Fixtures shared by the tests and the studies under ``scripts/``: never used by the pipeline.

- :mod:`~gn_convert.testing.photos`: crops of real photos that ship in scikit-learn, and models
  with non-trivial BatchNorm statistics measured on them.
- :mod:`~gn_convert.testing.bn_stats`: re-estimating and randomising BatchNorm statistics.
- :mod:`~gn_convert.testing.digits`: scikit-learn's digits, and a ResNet-18 teacher trained on them.
- :mod:`~gn_convert.testing.synthetic`: random images for smoke tests.
"""
