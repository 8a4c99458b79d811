"""Builders shared by the test modules (never imported from one test file into another).

- :mod:`helpers.models`: tiny seeded CNNs, agreement, the converted-and-exported test models.
- :mod:`helpers.onnx_cases`: one-node models of our op, their inputs and a float64 reference.
- :mod:`helpers.scripts`: the scripts under `scripts/`, loaded as modules for their tests.
- :mod:`helpers.triton`: Triton config parsing and clients for the deploy and serve tests.
"""
