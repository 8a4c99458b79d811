"""Every exception gn-convert raises on purpose, in one hierarchy.

:class:`GnConvertError` is the base. Errors the user's input causes (an unknown model, an
impossible group count, a bad weights file, an unwritable output, a file that is not ours)
derive from :class:`InputError`, which is also a ``ValueError`` (as Opacus's validators do),
so callers that already catch ``ValueError`` catch them. Errors of the environment (a missing
optional dependency, a kernel that does not build, a server that does not start) derive from
:class:`EnvironmentProblem`. Every message is one line that says what is wrong and what to do;
the CLI prints it and exits with status 2.
"""

from __future__ import annotations


class GnConvertError(Exception):
    """Base class of every error gn-convert raises on purpose."""


class InputError(GnConvertError, ValueError):
    """The user's input (a name, an option, a file, a model) cannot be used as given."""


class EnvironmentProblem(GnConvertError):
    """This machine lacks something the request needs (a package, a compiler, a GPU, a port)."""


# -- load ---------------------------------------------------------------------------------------
class UnknownModelError(InputError):
    """The model name is not a known classification model."""


class ExtraMissingError(EnvironmentProblem):
    """An optional dependency (timm, opacus) that the request needs is not installed."""


class WeightsError(InputError):
    """A weights file is missing, unreadable, corrupt or does not fit the model."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights are neither cached nor downloadable (offline)."""


# -- surgery ------------------------------------------------------------------------------------
class GroupPlanError(InputError):
    """No group count satisfies the requested policy for some layer, or an option is unknown."""


class UnsupportableLayerError(InputError):
    """A layer cannot be converted (a group would hold a single value, an unknown norm type)."""


class NoBatchNormError(InputError):
    """The model contains no BatchNorm layer to convert."""


class CheckpointError(InputError):
    """A converted checkpoint folder is missing, corrupt or not written by gn-convert."""


class OutputError(InputError):
    """An output path cannot be written."""


# -- data and fidelity --------------------------------------------------------------------------
class DataError(InputError):
    """A data source is missing, empty, unreadable or of an unsupported kind."""


class ModelMismatchError(InputError):
    """The student is not a GroupNorm conversion of the teacher."""


class OptionError(InputError):
    """An option has an impossible value (a negative step count, an unknown method...)."""


class UntrainedTeacherError(InputError):
    """The teacher was never trained (its BatchNorm statistics are the initial ones): nothing to distil."""


# -- onnx and parity ----------------------------------------------------------------------------
class ExportError(GnConvertError):
    """The model cannot be exported, or the written artifact failed its checks."""


class OnnxFileError(InputError):
    """A file given as an ONNX model is missing, unreadable, not ONNX, or not gn-convert's."""


class ParityError(InputError):
    """The parity check cannot run: the ONNX file does not match the model, or a bad option.

    A check that runs and finds a mismatch is not an error: it is a failed
    :class:`~gn_convert.parity.ParityReport`.
    """


# -- deploy, native kernel, bench ---------------------------------------------------------------
class DeployError(InputError):
    """A model cannot be deployed as asked (its inputs do not fit Triton, a bad option...)."""


class BuildMismatchError(EnvironmentProblem):
    """torch and torchvision (or another compiled pair) installed from builds that do not fit together."""


class ServeExtraMissingError(EnvironmentProblem):
    """The optional ``serve`` dependencies (nvidia-pytriton, tritonclient) are not installed."""


class ServerError(EnvironmentProblem):
    """The inference server did not start, or stopped unexpectedly."""


class NativeBuildError(EnvironmentProblem):
    """The native kernel library cannot be built or loaded here."""


class ProviderUnavailableError(EnvironmentProblem):
    """An onnxruntime execution provider (CUDA, TensorRT) is absent here or could not start."""


class SessionError(InputError):
    """onnxruntime refuses to load or run a model file (its own message's first line is kept)."""


class BenchError(InputError):
    """A benchmark cannot run as asked."""


MISMATCHED_BUILDS = ("operator torchvision::", "Couldn't load custom C++ ops")
"""What torchvision says when its compiled ops were built for another torch."""


def build_mismatch(err: BaseException) -> BuildMismatchError | None:
    """The one-line error for a torch/torchvision build mismatch behind ``err``, or None when it is not one."""
    if not any(text in str(err) for text in MISMATCHED_BUILDS):
        return None
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "(not installed)"

    return BuildMismatchError(
        f"torch {version('torch')} and torchvision {version('torchvision')} are not built for each other "
        f"({first_line(err, 80)}): reinstall both from the same index, e.g. `pip install --force-reinstall torch "
        "torchvision --index-url https://download.pytorch.org/whl/cpu`")


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty).

    Wrapped errors keep this line of their cause, so that what the library underneath said
    (the class torch refused to unpickle, the op onnxruntime lacks) reaches the user. A line
    longer than ``limit`` characters is cut after its last whole sentence that fits, else after
    its last whole word, with ``...``: never mid-sentence without saying so.
    """
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    head = line[: limit + 1]  # a sentence may end exactly at the limit
    end = max(head.rfind(mark) for mark in (". ", "! ", "? "))
    if end > 0:
        return line[: end + 1]
    space = line.rfind(" ", 0, limit + 1)
    return (line[:space].rstrip(",;:") if space > 0 else line[:limit]) + "..."
