"""Model loading by name: weights DEFAULT / none / a local file, and the supported list."""

from __future__ import annotations

import argparse
import urllib.request
from pathlib import Path

import pytest
import torch

import gn_convert
from gn_convert.errors import UnknownModelError, WeightsError, WeightsUnavailableError
from gn_convert.load import load_weights_into, parse_weights, read_state_dict
from gn_convert.load.names import build_model


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return gn_convert.load_model("resnet18", "none").state_dict()


def _same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_untrained_model_loads_in_eval_mode() -> None:
    model = gn_convert.load_model("resnet18", "none", num_classes=7)
    assert not model.training and model.fc.out_features == 7


@pytest.mark.parametrize("layout", ["plain", "checkpoint", "ddp", "safetensors"])
def test_local_weights_file_loads(tmp_path: Path, resnet18_state: dict, layout: str) -> None:
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    elif layout == "checkpoint":
        torch.save({"epoch": 3, "state_dict": resnet18_state}, path)
    elif layout == "ddp":
        torch.save({f"module.{k}": v for k, v in resnet18_state.items()}, path)
    else:
        torch.save(resnet18_state, path)
    assert _same_weights(gn_convert.load_model("resnet18", str(path)), resnet18_state)


def test_mismatched_weights_name_the_offending_keys(tmp_path: Path, resnet18_state: dict) -> None:
    path = tmp_path / "w.pt"
    torch.save(resnet18_state, path)
    # 80 missing: resnet34's extra blocks' weights and BatchNorm buffers; their 16 num_batches_tracked
    # are not counted (torch fills those in, as for a pre-0.4.1 state: see the test below)
    with pytest.raises(WeightsError, match=r"does not fit the model: missing: layer1\.2\.conv1\.weight, .* \(\+77 more\)"):
        gn_convert.load_model("resnet34", str(path))
    with pytest.raises(WeightsError, match=r"shape mismatch: fc.weight \(1000, 512\) vs \(10, 512\)"):
        gn_convert.load_model("resnet18", str(path), num_classes=10)


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(WeightsError, match="corrupt"):
        gn_convert.load_model("resnet18", str(path))


@pytest.mark.parametrize(("content", "kind"), [(b"hello, these are not weights\n", "a text file"),
                                             (b"", "an empty file"), (bytes(range(200, 256)), "a file of another format")])
def test_a_file_that_is_no_weights_file_is_named_in_one_line(tmp_path: Path, content: bytes, kind: str) -> None:
    """Defect: a text weights file reported `KeyError: 101` (pickle reading the letter 'e' as an opcode)."""
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        gn_convert.load_model("resnet18", str(path))
    message = str(info.value)
    assert message.startswith(f"weights file {path} is {kind}, not a state_dict saved with torch.save or as "
                              "safetensors") and "pass such a file" in message
    assert "KeyError" not in message and "\n" not in message


def test_a_safetensors_file_is_read_whatever_its_suffix(tmp_path: Path, resnet18_state: dict) -> None:
    from safetensors.torch import save_file

    save_file(resnet18_state, str(tmp_path / "weights.bin"))
    assert _same_weights(gn_convert.load_model("resnet18", str(tmp_path / "weights.bin")), resnet18_state)


class Payload:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""

    def __reduce__(self):  # noqa: D105
        return (print, ("this must never run",))


def test_pickled_code_is_never_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(WeightsError):
        gn_convert.load_model("resnet18", str(path))
    assert "must never run" not in capsys.readouterr().out


def test_missing_file_and_unknown_weights_name() -> None:
    with pytest.raises(WeightsError, match="not found"):
        gn_convert.load_model("resnet18", "/nonexistent/w.pt")
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        gn_convert.load_model("resnet18", "IMAGENET9K")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="resnet50"):
        gn_convert.load_model("resnt50", "none")


def test_default_weights_offline_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_args, **_kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        gn_convert.load_model("resnet18", "DEFAULT")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    # the API speaks the API's words (defect: it told API users to pass the CLI flag --weights none)
    assert 'weights="none"' in message and "--weights" not in message and "\n" not in message


def test_default_weights_offline_from_the_cli_names_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    from gn_convert.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    assert main(["resnet18", "--out", str(tmp_path / "o")]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("gn-convert: error:")]
    assert len(line) == 1 and "pass --weights none (untrained) or --weights PATH" in line[0], line
    assert 'weights="none"' not in line[0] and not (tmp_path / "o").exists()


def test_default_weights_come_from_torchvisions_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      resnet18_state: dict) -> None:
    """A file in torch's hub cache is what DEFAULT loads, with no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / "resnet18-f37072fd.pth")
    monkeypatch.setattr("gn_convert.load.weights.check_cached", lambda path: None)  # this file is no real download
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network was used"))
    model = gn_convert.load_model("resnet18", "DEFAULT")
    assert _same_weights(model, resnet18_state)


@pytest.mark.parametrize("hash_checked", [True, False])
def test_a_file_planted_in_torchvisions_cache_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, hash_checked: bool) -> None:
    """Defect: torchvision's builders unpickled cached weights with weights_only=False, so a file put in
    $TORCH_HOME/hub/checkpoints under a weights file's name ran its code. Now the file must match the hash in
    its name, and (that check aside) is read as tensors only."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({"fc.weight": Payload()}, cache / "resnet18-f37072fd.pth")
    if not hash_checked:
        monkeypatch.setattr("gn_convert.load.weights.check_cached", lambda path: None)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network was used"))
    with pytest.raises(WeightsError, match="does not match the hash" if hash_checked else "Unpickling|weights_only"):
        gn_convert.load_model("resnet18", "DEFAULT")
    assert "must never run" not in capsys.readouterr().out


def test_list_models_is_computed_from_torchvision() -> None:
    names = gn_convert.list_models()
    assert {"resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet", "vgg11_bn"} <= set(names)
    assert not {"vgg11", "alexnet", "vit_b_16", "convnext_tiny", "swin_t", "squeezenet1_0"} & set(names)
    assert names == sorted(names) and len(names) > 50



def test_state_dict_without_num_batches_tracked_loads(tmp_path: Path, resnet18_state: dict) -> None:
    """Defect: a BatchNorm state from before torch 0.4.1 (no num_batches_tracked) was refused
    as 'missing' keys; torch's own load hook fills them in."""
    old = {k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) == len(resnet18_state) - 20
    path = tmp_path / "old.pt"
    torch.save(old, path)
    model = gn_convert.load_model("resnet18", str(path))
    assert all(torch.equal(v, resnet18_state[k]) for k, v in model.state_dict().items() if k in old)
    fresh = build_model("resnet18")
    load_weights_into(fresh, old, "an old state")
    assert torch.equal(fresh.layer1[0].bn1.running_var, resnet18_state["layer1.0.bn1.running_var"])


def test_a_torchvision_reference_checkpoint_names_what_torch_refused(tmp_path: Path, resnet18_state: dict) -> None:
    """Defect: torchvision's reference scripts save {"model": sd, "args": argparse.Namespace};
    weights_only loading refuses the Namespace, and the message dropped torch's own reason."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": resnet18_state, "args": argparse.Namespace(lr=0.1, epochs=90)}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and "corrupt" in message
    assert "weights_only" in message or "argparse.Namespace" in message, message
    assert "Namespace" in message, message


def test_qualified_weights_names_are_parsed_by_the_one_parser() -> None:
    spec = parse_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    assert spec.kind == "torchvision" and str(spec.enum) == "ResNet50_Weights.IMAGENET1K_V2"
    assert parse_weights("resnet50", "IMAGENET1K_V2").enum is spec.enum
    assert parse_weights("resnet50", "none").kind == "none"
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        parse_weights("resnet50", "ResNet18_Weights.IMAGENET1K_V1")


def test_a_truncated_weights_file_is_refused_in_whole_sentences(tmp_path: Path, resnet18_state: dict) -> None:
    """Defect: torch's reason was cut at 200 characters, mid-sentence ("... that your checkpoint file is)")."""
    whole = tmp_path / "whole.pt"
    torch.save(resnet18_state, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(WeightsError) as info:
        gn_convert.load_model("resnet18", str(truncated))
    message = str(info.value)
    reason = message[message.index("(RuntimeError: ") + len("(RuntimeError: "):message.index("); only tensors")]
    assert reason.endswith(".") and "failed finding central directory." in reason, message
    assert "\n" not in message and len(reason) <= 200


def test_first_line_cuts_a_long_line_at_a_sentence_or_word_end() -> None:
    from gn_convert.errors import first_line

    sentences = RuntimeError("One short sentence. " + "word " * 80)
    assert first_line(sentences, 60) == "One short sentence."
    assert first_line(RuntimeError("word " * 80), 22) == "word word word word..."
    assert first_line(RuntimeError("x" * 50), 10) == "x" * 10 + "..."
    assert first_line(RuntimeError("fits. Whole."), 12) == "fits. Whole."


def test_a_state_with_an_extra_key_loads_nothing(resnet18_state: dict) -> None:
    """Defect: missing or unexpected keys were found after a non-strict load had already changed the model."""
    from gn_convert.load.state_dict import load_weights_into

    model = gn_convert.load_model("resnet18", "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="unexpected: head.extra"):
        load_weights_into(model, {**resnet18_state, "head.extra": torch.zeros(1)}, "the file")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    missing = {k: v for k, v in resnet18_state.items() if k != "fc.bias"}
    with pytest.raises(WeightsError, match="missing: fc.bias"):
        load_weights_into(model, missing, "the file")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
