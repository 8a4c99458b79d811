"""Loading: model names, building architectures, weights resolution and state-dict reading.

- :mod:`~gn_convert.load.names`: :func:`list_models`, :func:`build_model`.
- :mod:`~gn_convert.load.weights`: :func:`parse_weights`, :func:`resolve_source`, :func:`load_model`.
- :mod:`~gn_convert.load.state_dict`: :func:`read_state_dict`, :func:`load_weights_into`.
"""

from __future__ import annotations

from gn_convert.load.names import build_model, check_model_name, list_models
from gn_convert.load.state_dict import load_weights_into, read_state_dict
from gn_convert.load.weights import ModelSource, WeightsSpec, load_model, parse_weights, resolve_source

__all__ = ["ModelSource", "WeightsSpec", "build_model", "check_model_name", "list_models", "load_model",
           "load_weights_into", "parse_weights", "read_state_dict", "resolve_source"]
