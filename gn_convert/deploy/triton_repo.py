"""A Triton model repository for an exported ONNX model, checked against Triton's own schema.

Layout written under the repository folder::

    NAME/config.pbtxt     backend onnxruntime, tensors read from the graph, dynamic batching
    NAME/1/model.onnx     the model (and its external-data files, if any)
    NAME/labels.txt       class names, one a line (only when labels are given)
    NAME/libgn_convert_ops.so   the native GroupNorm kernel (only with ``native_ops``), named in
                          the config's ``model_operations.op_library_filename``

With ``blocked``, ``model.onnx`` is the model rewritten for one CPU family's blocked layout, and the
config opens with comments that name that target (:mod:`gn_convert.deploy.blocked_target`).

The config is built as Triton's ``ModelConfig`` protobuf (``tritonclient`` ships it), written
as text, and parsed back and checked before the model folder is renamed into place: a
repository that is reported written is one Triton's config parser accepts.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from gn_convert.deploy.blocked_target import (
    blocked_metadata,
    check_config_comments,
    check_target_block,
    config_comments,
)
from gn_convert.deploy.extra import model_config_pb2
from gn_convert.deploy.onnx_io import ModelIO, read_model_io
from gn_convert.deploy.served_check import check_served
from gn_convert.errors import DeployError
from gn_convert.output_folder import staged_folder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
VERSION = "1"
INSTANCE_KINDS = ("cpu", "gpu")
DEFAULT_SERVER_REPO = "/models"
"""Where the Triton container mounts the repository (``-v REPO:/models``)."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""A model name, matched whole (``fullmatch``): a plain folder name, never ``.``, ``..`` or hidden."""


def check_model_name(name: str) -> str:
    """``name`` if it is a valid model name for a repository folder.

    Raises:
        DeployError: it is not (``.``, ``..``, a leading dot, a slash, a newline, ...).
    """
    if not NAME_PATTERN.fullmatch(name):
        raise DeployError(f"model name {name!r} must be letters, digits, '_', '.' and '-', not starting with '.'")
    return name


def default_name(onnx_path: str | Path) -> str:
    """The model name for ``onnx_path``: its stem, or its folder's name for a plain ``model.onnx``."""
    path = Path(onnx_path).absolute()
    stem = path.parent.name if path.stem == "model" and path.parent.name else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "model"


def _check_batching(io: ModelIO, max_batch_size: int, path: Path) -> None:
    if max_batch_size < 0:
        raise DeployError(f"--max-batch-size must be 0 (no batching) or more, not {max_batch_size}")
    if max_batch_size == 0 or io.batch_dynamic():
        return
    fixed = [t.name for t in (*io.inputs, *io.outputs) if not t.shape or t.shape[0] is not None]
    raise DeployError(f"{path} has a fixed batch dimension ({', '.join(fixed)}); export it with a "
                      "dynamic batch, or pass --max-batch-size 0")


def build_config(io: ModelIO, *, name: str, max_batch_size: int, instance: str = "cpu",
                 instance_count: int = 1, queue_delay_us: int = 100,
                 labels_output: str | None = None, op_library: str | None = None) -> Any:
    """Triton's ``ModelConfig`` for an ONNX model served by the onnxruntime backend.

    Args:
        io: the model's inputs and outputs (:func:`read_model_io`).
        name: the model name (the folder name in the repository).
        max_batch_size: the largest batch Triton forms; 0 disables batching (dims then
            include the batch dimension).
        instance: ``cpu`` or ``gpu``: where the instances run (``KIND_CPU`` / ``KIND_GPU``).
        instance_count: model instances (per GPU for ``gpu``).
        queue_delay_us: how long dynamic batching waits to fill a batch, in microseconds.
        labels_output: the output that carries :data:`LABELS_FILE`, or None.
        op_library: a custom-op library's path as the server sees it
            (``model_operations.op_library_filename``), or None.

    Returns:
        A ``tritonclient.grpc.model_config_pb2.ModelConfig``.
    """
    pb = model_config_pb2()
    batched = max_batch_size > 0
    config = pb.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size,
                            default_model_filename=MODEL_FILE)
    for spec in io.inputs:
        config.input.add(name=spec.name, data_type=pb.DataType.Value(f"TYPE_{spec.datatype}"),
                         dims=spec.dims(batched))
    for spec in io.outputs:
        out = config.output.add(name=spec.name, data_type=pb.DataType.Value(f"TYPE_{spec.datatype}"),
                                dims=spec.dims(batched))
        if spec.name == labels_output:
            out.label_filename = LABELS_FILE
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    kind = pb.ModelInstanceGroup.Kind.Value(f"KIND_{instance.upper()}")
    config.instance_group.add(kind=kind, count=instance_count)
    if op_library is not None:
        config.model_operations.op_library_filename.append(op_library)
    return config


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text with Triton's ``ModelConfig`` protobuf.

    Raises:
        DeployError: the text is not a valid Triton model config.
    """
    from google.protobuf import text_format

    config = model_config_pb2().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise DeployError(f"the model config does not parse as Triton's ModelConfig: {err}") from None
    return config


def read_config(model_dir: str | Path) -> Any:
    """Read and parse ``MODEL_DIR/config.pbtxt`` (a model folder of a Triton repository)."""
    return parse_config((Path(model_dir) / CONFIG_FILE).read_text())


def _labels_output(io: ModelIO, labels: Sequence[str], path: Path) -> str:
    """The output the labels belong to: the single output whose last dimension they match."""
    fits = [t for t in io.outputs if t.shape and t.shape[-1] == len(labels)]
    if len(fits) != 1:
        sizes = ", ".join(f"{t.name} {list(t.shape)}" for t in io.outputs)
        raise DeployError(f"{len(labels)} labels fit no single output of {path} ({sizes}); "
                          "pass the labels of this model")
    return fits[0].name


def _external_files(path: Path) -> list[str]:
    """The external-data files (relative locations) the ONNX model at ``path`` refers to."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = [*model.graph.initializer,
               *(a.t for node in model.graph.node for a in node.attribute if a.HasField("t"))]
    helper = onnx.external_data_helper
    return sorted({helper.ExternalDataInfo(t).location for t in tensors if helper.uses_external_data(t)})


def _write_model(onnx_path: Path, version_dir: Path, inlined: bool) -> None:
    """Copy the model (and its external data) into ``version_dir``, or write its inlined form."""
    from gn_convert.onnx.export import lower_onnx
    from gn_convert.onnx.targets import TARGET_KEY

    version_dir.mkdir()
    target = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if inlined and target.get(TARGET_KEY) != "inlined":
        lower_onnx(onnx_path, version_dir / MODEL_FILE, "inlined")
        return
    shutil.copy2(onnx_path, version_dir / MODEL_FILE)
    for location in _external_files(onnx_path):
        source, dest = onnx_path.parent / location, version_dir / location
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise DeployError(f"{onnx_path} refers to weights outside its folder ({location}); "
                              "save it with its external data beside it")
        if not source.is_file():
            raise DeployError(f"{onnx_path} keeps weights in {source}, which is missing; "
                              "copy it beside the model")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def check_model_dir(model_dir: str | Path, expected: Any | None = None) -> Any:
    """Parse a model folder's config with Triton's protobuf and check it against its files.

    Checks: the config parses; it equals ``expected`` when given; inputs and outputs are named,
    unique, with positive or -1 dims; the version folder holds the model file; a label file
    has one line per class of its output; a blocked-layout model has its kernel library and the
    comments that name its target.

    Args:
        model_dir: ``REPO/NAME``.
        expected: the ``ModelConfig`` that was meant to be written, or None.

    Returns:
        The parsed ``ModelConfig``.

    Raises:
        DeployError: a check failed (the message names it).
    """
    model_dir = Path(model_dir)
    text = (model_dir / CONFIG_FILE).read_text()
    config = parse_config(text)
    if expected is not None and config != expected:
        raise DeployError(f"{model_dir / CONFIG_FILE} does not read back as written; report this")
    names = [t.name for t in (*config.input, *config.output)]
    if not all(names) or len(set(names)) != len(names):
        raise DeployError(f"{model_dir / CONFIG_FILE}: tensor names must be non-empty and unique: {names}")
    for tensor in (*config.input, *config.output):
        if any(d == 0 or d < -1 for d in tensor.dims):
            raise DeployError(f"{model_dir / CONFIG_FILE}: {tensor.name} has invalid dims {list(tensor.dims)}")
    if not (model_dir / VERSION / config.default_model_filename).is_file():
        raise DeployError(f"{model_dir / VERSION} holds no {config.default_model_filename}")
    for library in config.model_operations.op_library_filename:
        if not (model_dir / Path(library).name).is_file():
            raise DeployError(f"{model_dir} lacks {Path(library).name}, which its config loads")
    for out in config.output:
        if out.label_filename:
            count = len((model_dir / out.label_filename).read_text().splitlines())
            if list(out.dims)[-1:] != [count]:
                raise DeployError(f"{out.label_filename} has {count} labels, {out.name} has dims {list(out.dims)}")
    metadata = blocked_metadata(model_dir / VERSION / config.default_model_filename)
    if metadata:
        if not config.model_operations.op_library_filename:
            raise DeployError(f"{model_dir} holds a blocked-layout model but its config loads no kernel library; "
                              "write it with `gn-convert deploy --native-ops --blocked`")
        check_config_comments(text, metadata, model_dir / CONFIG_FILE)
    return config


def write_triton_repo(
    onnx_path: str | Path,
    repo_dir: str | Path,
    *,
    name: str | None = None,
    max_batch_size: int = 8,
    instance: str = "cpu",
    instance_count: int = 1,
    queue_delay_us: int = 100,
    inlined: bool = False,
    labels: Sequence[str] | None = None,
    native_ops: str | Path | None = None,
    blocked: bool = False,
    target_block: int | None = None,
    server_repo: str = DEFAULT_SERVER_REPO,
    force: bool = False,
) -> Path:
    """Write a Triton model repository entry ``REPO/NAME`` for an exported ONNX model.

    The model folder is assembled under a temporary name, its config parsed back with
    Triton's own ``ModelConfig`` protobuf and checked (:func:`check_model_dir`), a shipped kernel
    checked as the server will run it, and only then renamed into place; other models in
    ``repo_dir`` are left alone.

    Args:
        onnx_path: the exported model (custom-op function form, inlined, or standard).
        repo_dir: the repository folder (created if missing); mount it as ``/models``.
        name: the model name; default :func:`default_name` of ``onnx_path``.
        max_batch_size: the largest batch Triton forms (default 8); 0 disables batching.
            A positive value needs a dynamic leading (batch) dimension on every tensor.
        instance: ``cpu`` (default) or ``gpu``.
        instance_count: model instances (default 1; per GPU for ``gpu``).
        queue_delay_us: dynamic batching's wait to fill a batch, in microseconds (default 100).
        inlined: ship the model with the GroupNorm function inlined into standard ops (for
            backends without ONNX local functions, such as OpenVINO); default False ships the
            file as given (onnxruntime inlines the function at load).
        labels: class names for the classifier output (written as ``labels.txt``), or None.
        native_ops: gn-convert's native GroupNorm kernel library (``gn-convert native``) to ship
            in the model folder and load with ``model_operations``, or None. It must be built
            for the server's CPU and against headers no newer than the server's onnxruntime.
            The model is run here as the server will run it (the library registered, every
            onnxruntime optimisation, the plain kernel) and compared with the model without the
            library (:func:`gn_convert.deploy.served_check.check_served`) before it is written.
        blocked: with ``native_ops``, ship the model rewritten for onnxruntime's blocked layout
            (:mod:`gn_convert.native.nchwc`: no reorders around GroupNorm, the Add and activation
            fused), written here with ``native_ops`` and checked, as the server runs it, against the
            model without the library. It runs only on CPUs of its block and with this onnxruntime
            (recorded in its metadata and the config's comments; its kernels refuse other CPUs).
        target_block: the block size of the servers' CPUs, 8 or 16 (default: this machine's); it must
            be this machine's, since onnxruntime reorders the weights for the CPU it runs on.
        server_repo: where the server mounts the repository (default ``/models``); the
            library's path in the config is ``SERVER_REPO/NAME/libgn_convert_ops.so``.
        force: replace an existing ``REPO/NAME``.

    Returns:
        The model folder ``REPO/NAME``.

    Raises:
        DeployError: bad options, a model Triton cannot serve, or a config that fails its check.
        ServeExtraMissingError: ``tritonclient`` is not installed.
        OutputError: the repository cannot be written, or ``REPO/NAME`` exists without ``force``.
    """
    onnx_path = Path(onnx_path)
    name = check_model_name(name or default_name(onnx_path))
    if instance not in INSTANCE_KINDS:
        raise DeployError(f"instance must be one of {', '.join(INSTANCE_KINDS)}, not {instance!r}")
    if instance_count < 1:
        raise DeployError(f"instance count must be at least 1, not {instance_count}")
    if (Path(repo_dir) / name).exists() and not force:
        raise DeployError(f"{Path(repo_dir) / name} exists; pass --force to replace it or choose another --name")
    io = read_model_io(onnx_path)
    _check_batching(io, max_batch_size, onnx_path)
    labels_output = _labels_output(io, labels, onnx_path) if labels else None
    native_ops = Path(native_ops) if native_ops is not None else None
    if native_ops is not None:
        if not native_ops.is_file():
            raise DeployError(f"native ops library {native_ops} not found; build it with `gn-convert native`")
        if inlined or instance != "cpu":
            raise DeployError("the native GroupNorm kernel runs the custom op on CPU instances; drop --inlined "
                              "(it removes the op) and use --instance cpu, or drop --native-ops")
    if blocked and native_ops is None:
        raise DeployError("--blocked ships the blocked-layout model with the native kernel that runs it; add --native-ops")
    if target_block is not None and not blocked:
        raise DeployError("--target-block names the CPU family of a blocked-layout model; add --blocked")
    if blocked:
        check_target_block(target_block)
    op_library = f"{server_repo.rstrip('/')}/{name}/{native_ops.name}" if native_ops is not None else None
    config = build_config(io, name=name, max_batch_size=max_batch_size, instance=instance,
                          instance_count=instance_count, queue_delay_us=queue_delay_us,
                          labels_output=labels_output, op_library=op_library)
    from google.protobuf import text_format

    with staged_folder(Path(repo_dir) / name, force, option="--triton-repo or --name", within=repo_dir) as tmp:
        if native_ops is not None:
            shutil.copy2(native_ops, tmp / native_ops.name)
        comments = ""
        if blocked and native_ops is not None:
            (tmp / VERSION).mkdir()
            error = check_served(tmp / VERSION / MODEL_FILE, tmp / native_ops.name, blocked_from=onnx_path)
            log.info("the blocked-layout model as the server runs it matches the model without the library "
                     "(max_rel %.1e)", error)
            comments = config_comments(blocked_metadata(tmp / VERSION / MODEL_FILE))
        else:
            _write_model(onnx_path, tmp / VERSION, inlined)
        if labels:
            (tmp / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
        (tmp / CONFIG_FILE).write_text(comments + text_format.MessageToString(config))
        check_model_dir(tmp, expected=config)
        if native_ops is not None and not blocked:
            error = check_served(tmp / VERSION / MODEL_FILE, tmp / native_ops.name)
            log.info("the native kernel as the server runs it matches the model without it (max_rel %.1e)", error)
    model_dir = Path(repo_dir).absolute() / name
    log.info("wrote Triton model %s (%d inputs, %d outputs, max_batch_size %d, %s)", model_dir,
             len(io.inputs), len(io.outputs), max_batch_size, instance)
    return model_dir
