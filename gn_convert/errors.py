"""Exception types of gn-convert.

Every error a user can cause (an unknown model, an impossible group count, a bad weights
file, an unwritable output) is a :class:`GnConvertError`. Its message is one line that says
what is wrong and what to do; the CLI prints it and exits with status 2.
"""

from __future__ import annotations


class GnConvertError(Exception):
    """Base class of every error caused by the user's input."""


class UnknownModelError(GnConvertError):
    """The model name is not a torchvision classification model."""


class WeightsError(GnConvertError):
    """A weights file is missing, unreadable, corrupt or does not fit the model."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights are neither cached nor downloadable (offline)."""


class GroupPlanError(GnConvertError):
    """No group count satisfies the requested policy for some layer."""


class UnsupportableLayerError(GnConvertError):
    """A layer cannot be converted (for example, a group would hold a single value)."""


class NoBatchNormError(GnConvertError):
    """The model contains no BatchNorm layer to convert."""


class CheckpointError(GnConvertError):
    """A converted checkpoint folder is missing, corrupt or not written by gn-convert."""


class OutputError(GnConvertError):
    """An output path cannot be written."""
