"""What a blocked-layout model shipped to Triton is for (``deploy --native-ops --blocked``).

The blocked model (:mod:`gn_convert.native.nchwc`) embeds onnxruntime's convolution weights reordered
for one NCHWc block size, so it is valid only on CPUs of that block and with that onnxruntime. The
block is a CPU family: onnxruntime's MLAS takes 16 where the CPU has AVX-512F (with AVX2 and FMA)
and 8 on every other x86-64 CPU. onnxruntime reorders for the CPU it runs on, so the model for a
block is written on a CPU of that block; the deploy refuses any other target.

The target is recorded twice: in the model's ``metadata_props`` (:func:`gn_convert.native.nchwc.blocked_metadata`)
and as comments at the top of ``config.pbtxt`` (:func:`config_comments`; Triton's text-format parser
ignores them), whose first line :func:`check_config_comments` reads back. The blocked kernels
themselves refuse, when onnxruntime creates them, to run on a CPU of another block.
"""

from __future__ import annotations

import re
from pathlib import Path

from gn_convert.errors import DeployError

FAMILIES: dict[int, str] = {
    8: "x86-64 CPUs without AVX-512F (AVX2 or older)",
    16: "x86-64 CPUs with AVX-512F",
}
"""onnxruntime's NCHWc block size -> the CPUs that have it (MLAS's choice, ``native/nchwc_block.h``)."""
TARGET_BLOCKS = tuple(FAMILIES)
_HEAD = re.compile(r"^# gn-convert blocked layout: block (\d+), onnxruntime (\S+), kernel library (\S+)$", re.MULTILINE)


def check_target_block(target_block: int | None) -> int:
    """The block size to write the model for: ``target_block``, default this machine's.

    Raises:
        DeployError: this machine has no blocked layout, ``target_block`` is not 8 or 16, or it is not
            this machine's block (the model cannot be written here).
    """
    from gn_convert.native.nchwc import block_size

    here = block_size()
    if target_block is not None and target_block not in FAMILIES:
        raise DeployError(f"--target-block must be one of {', '.join(map(str, TARGET_BLOCKS))} "
                          f"(8: {FAMILIES[8]}; 16: {FAMILIES[16]}), not {target_block}")
    if here not in FAMILIES:
        raise DeployError(f"onnxruntime has no blocked (NCHWc) layout on this CPU (block {here}); run the deploy "
                          "on a machine of the target CPU family, or drop --blocked")
    if target_block is not None and target_block != here:
        raise DeployError(f"the blocked model for block {target_block} ({FAMILIES[target_block]}) can only be "
                          f"written on such a CPU (onnxruntime reorders the weights for the CPU it runs on; this "
                          f"one's block is {here}): run `gn-convert deploy --native-ops --blocked` on a machine "
                          "of the target family, or drop --blocked")
    return here


def blocked_metadata(model: str | Path) -> dict[str, str]:
    """The blocked-layout entries of a model's metadata (empty for a plain model)."""
    import onnx

    from gn_convert.native.nchwc import BLOCK_KEY, LAYOUT_KEY

    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    if BLOCK_KEY not in props:
        return {}
    return {key: value for key, value in props.items() if key == LAYOUT_KEY or key.startswith("gn_convert.nchwc_")}


def config_comments(metadata: dict[str, str]) -> str:
    """The comment lines that open ``config.pbtxt`` for a blocked model (each ends in a newline)."""
    from gn_convert.native.nchwc import BLOCK_KEY, LIBRARY_TARGET_KEY, ONNXRUNTIME_KEY, WRITTEN_ON_KEY

    block = int(metadata[BLOCK_KEY])
    lines = [
        f"gn-convert blocked layout: block {block}, onnxruntime {metadata[ONNXRUNTIME_KEY]}, "
        f"kernel library {metadata[LIBRARY_TARGET_KEY]}",
        f"model.onnx runs GroupNorm on onnxruntime's blocked (NCHWc) layout for block {block}: "
        f"{FAMILIES.get(block, 'unknown CPUs')}, written on {metadata.get(WRITTEN_ON_KEY, 'an unrecorded CPU')}.",
        f"Serve it only on such CPUs and with onnxruntime {metadata[ONNXRUNTIME_KEY]}; on a CPU of another block "
        "its kernels refuse to load (one line in the server's log).",
        "Elsewhere, rewrite it there (`gn-convert deploy --native-ops --blocked`) or deploy the plain model.",
    ]
    return "".join(f"# {line}\n" for line in lines)


def check_config_comments(config_text: str, metadata: dict[str, str], where: Path) -> None:
    """Check that a blocked model's config opens with the comments that name its target.

    Raises:
        DeployError: they are missing or name another block, onnxruntime or library.
    """
    from gn_convert.native.nchwc import BLOCK_KEY, LIBRARY_TARGET_KEY, ONNXRUNTIME_KEY

    head = _HEAD.search(config_text)
    want = (metadata[BLOCK_KEY], metadata[ONNXRUNTIME_KEY], metadata[LIBRARY_TARGET_KEY])
    if head is None or head.groups() != want:
        found = "none" if head is None else f"block {head.group(1)}, onnxruntime {head.group(2)}"
        raise DeployError(f"{where} holds a blocked model for block {want[0]}, onnxruntime {want[1]}, but its comments "
                          f"name {found}; write it again with `gn-convert deploy --native-ops --blocked`")
