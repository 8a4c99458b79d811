"""The disk cache of blocked-layout rewrites (gn_convert.native.nchwc_cache): a second open of a model
skips onnxruntime's optimisation and the rewrite and gives the same outputs; what the key covers
(library, onnxruntime, CPU, the model's external data); the size limit; the opt-outs; entries that
are corrupt or give another answer are deleted, with a warning, and rebuilt.

Each test has a cache of its own (``$GN_CONVERT_CACHE`` in its temporary folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gn_convert.native import build as native_build
from gn_convert.native import nchwc, nchwc_cache
from gn_convert.native.headers import CACHE_VAR
from gn_convert.runtime import open_session
from helpers.blocked import export_small_se_net

BLOCK = nchwc.block_size()
pytestmark = pytest.mark.skipif(BLOCK not in (8, 16), reason=f"onnxruntime has no NCHWc layout on this CPU (block {BLOCK})")
X = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_small_se_net(tmp_path_factory.mktemp("cache") / "se.onnx")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own cache; the folder the entries go to."""
    monkeypatch.setenv(CACHE_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(nchwc_cache.NO_CACHE_VAR, raising=False)
    monkeypatch.delenv(nchwc_cache.LIMIT_VAR, raising=False)
    return tmp_path / "cache" / nchwc_cache.FOLDER


@pytest.fixture
def optimisations(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """One item per call of onnxruntime's optimisation pass that the rewrite starts from."""
    calls: list[object] = []
    real = nchwc.optimized_graph

    def spy(model, library):
        calls.append(model)
        return real(model, library)

    monkeypatch.setattr(nchwc, "optimized_graph", spy)
    return calls


def _out(session) -> np.ndarray:
    return session.run(None, {"input": X})[0]


def _plain(model: Path, library: Path) -> np.ndarray:
    return _out(open_session(model, library=library, blocked=False))


def _entries(cache: Path) -> list[str]:
    return sorted(p.stem for p in cache.glob("*.npz")) if cache.is_dir() else []


def test_a_second_open_hits_the_cache_skips_the_optimisation_and_gives_the_same_outputs(
        model: Path, native_library: Path, cache: Path, optimisations: list, caplog) -> None:
    first = open_session(model, library=native_library, blocked=True)
    assert len(optimisations) == 1 and len(_entries(cache)) == 1
    assert sorted(p.suffix for p in cache.iterdir()) == [".npz", ".onnx"]
    with caplog.at_level(logging.INFO, logger="gn_convert.native.nchwc"):
        second = open_session(model, library=native_library, blocked=True, threads=2)
        again = open_session(model.read_bytes(), library=native_library)  # the same bytes, default blocked=None
    assert len(optimisations) == 1  # neither hit optimised nor rewrote
    assert caplog.text.count("from the cache (2 GroupNorm layers; probe reproduced)") == 2
    np.testing.assert_array_equal(_out(second), _out(first))
    np.testing.assert_array_equal(_out(again), _out(first))
    want = _plain(model, native_library)
    assert np.abs(_out(second) - want).max() / np.abs(want).max() < 1e-5
    ops = {n.op_type for n in onnx.load_from_string(nchwc_cache.lookup(_entries(cache)[0]).data).graph.node}
    assert {"GroupNormNchwc", "ScaleNchwc"} <= ops


def test_a_changed_library_onnxruntime_or_cpu_misses(model: Path, native_library: Path, cache: Path,
                                                     optimisations: list, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    open_session(model, library=native_library, blocked=True)
    other = tmp_path / "other" / native_library.name
    other.parent.mkdir()
    other.write_bytes(native_library.read_bytes() + b"\0")  # another library's bytes, still loadable
    open_session(model, library=other, blocked=True)
    monkeypatch.setattr(ort, "__version__", "1.99.0")
    open_session(model, library=native_library, blocked=True)
    monkeypatch.setattr(native_build, "cpu_identity", lambda: "model name : Another CPU\nflags : sse2 avx2")
    open_session(model, library=native_library, blocked=True)
    assert len(optimisations) == 4 and len(_entries(cache)) == 4
    open_session(model, library=native_library, blocked=True)  # the last configuration again: a hit
    assert len(optimisations) == 4


def test_the_key_covers_the_models_external_data(tmp_path: Path, model: Path) -> None:
    proto = onnx.load(str(model))
    outside = tmp_path / "outside.onnx"
    onnx.save_model(proto, str(outside), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    before = nchwc_cache.model_digest(outside)
    with open(tmp_path / "weights.bin", "r+b") as stream:  # one weight changes; the .onnx file does not
        stream.seek(16)
        stream.write(b"\x01\x02\x03\x04")
    assert nchwc_cache.model_digest(outside) != before
    assert nchwc_cache.model_digest(model) == nchwc_cache.model_digest(model.read_bytes())


def _entry(seed: int, size: int = 800_000) -> nchwc_cache.Entry:
    probe = nchwc_cache.Probe({"input": np.zeros((1, 2), np.float32)}, [np.ones(3, np.float32)])
    return nchwc_cache.Entry(np.random.default_rng(seed).bytes(size), 1, probe)


def _age(cache: Path, key: str, when: float) -> None:
    for path in cache.glob(f"{key}.*"):
        os.utime(path, (when, when))


def test_the_size_limit_evicts_the_least_recently_used(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nchwc_cache.LIMIT_VAR, "2")  # MB: two entries of 0.8 MB fit, three do not
    assert nchwc_cache.store("a", _entry(0)) and nchwc_cache.store("b", _entry(1))
    _age(cache, "a", 1_000_000)
    _age(cache, "b", 2_000_000)
    assert nchwc_cache.lookup("a") is not None  # a hit makes "a" the most recently used
    assert nchwc_cache.store("c", _entry(2))
    assert _entries(cache) == ["a", "c"]
    assert nchwc_cache.lookup("a").data == _entry(0).data and nchwc_cache.lookup("c").data == _entry(2).data
    assert not nchwc_cache.store("big", _entry(3, size=3 << 20))  # alone over the limit: not kept
    assert _entries(cache) == ["a", "c"]


def test_the_opt_outs_bypass_the_cache(model: Path, native_library: Path, cache: Path, optimisations: list,
                                       monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    open_session(model, library=native_library, blocked=True, cache=False)
    open_session(model, library=native_library, blocked=True, cache=False)
    assert len(optimisations) == 2 and not cache.exists()
    monkeypatch.setenv(nchwc_cache.NO_CACHE_VAR, "1")
    open_session(model, library=native_library, blocked=True)
    monkeypatch.delenv(nchwc_cache.NO_CACHE_VAR)
    monkeypatch.setenv(nchwc_cache.LIMIT_VAR, "0")
    open_session(model, library=native_library, blocked=True)
    assert len(optimisations) == 4 and not cache.exists()
    monkeypatch.setenv(nchwc_cache.LIMIT_VAR, "lots")  # a typo warns and keeps the default, never fails a session
    with caplog.at_level(logging.WARNING):
        open_session(model, library=native_library, blocked=True)
    assert f"{nchwc_cache.LIMIT_VAR} must be a whole number of megabytes" in caplog.text
    assert len(_entries(cache)) == 1


def _wrong_answer(data: bytes) -> bytes:
    """The cached model with one GroupNorm normalising over one group: valid, and wrong."""
    proto = onnx.load_from_string(data)
    node = next(n for n in proto.graph.node if n.op_type == nchwc.FUSED_OP)
    next(a for a in node.attribute if a.name == "num_groups").i = 1
    return proto.SerializeToString()


@pytest.mark.parametrize("damage", ["model bytes", "record", "wrong answer"])
def test_a_corrupt_or_wrong_entry_is_deleted_with_a_warning_and_rebuilt(
        model: Path, native_library: Path, cache: Path, optimisations: list, damage: str, caplog) -> None:
    open_session(model, library=native_library, blocked=True)
    key = _entries(cache)[0]
    if damage == "model bytes":
        data = bytearray((cache / f"{key}.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (cache / f"{key}.onnx").write_bytes(bytes(data))
    elif damage == "record":
        (cache / f"{key}.npz").write_bytes(b"not a record")
    else:  # a well-formed entry (its hash recorded) whose model gives another answer
        entry = nchwc_cache.lookup(key)
        nchwc_cache.store(key, nchwc_cache.Entry(_wrong_answer(entry.data), entry.fused, entry.probe))
    with caplog.at_level(logging.WARNING):
        session = open_session(model, library=native_library, blocked=True)
    expected = {"model bytes": "differs from its record", "record": "cannot be read",
                "wrong answer": "does not reproduce its probe"}[damage]
    assert f"deleting the cached blocked-layout model {key}" in caplog.text and expected in caplog.text
    assert len(optimisations) == 2  # rebuilt, not trusted
    want = _plain(model, native_library)
    assert np.abs(_out(session) - want).max() / np.abs(want).max() < 1e-5
    rebuilt = nchwc_cache.lookup(key)
    assert rebuilt is not None
    nchwc.check_probe(open_session(rebuilt.data, library=native_library, blocked=False), rebuilt.probe)


def test_a_cache_folder_others_can_write_is_not_used(model: Path, native_library: Path, cache: Path,
                                                      optimisations: list, caplog: pytest.LogCaptureFixture) -> None:
    """A consistent bad entry (a model and a record that agree) written by someone else passes the checks
    made when an entry is read: the cache is used only where no one else can write."""
    open_session(model, library=native_library, blocked=True)
    assert cache.stat().st_mode & 0o777 == 0o700
    cache.chmod(0o777)
    nchwc_cache._warn_shared.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gn_convert.native.nchwc_cache"):
        open_session(model, library=native_library, blocked=True)
    assert len(optimisations) == 2  # rewritten again, not read from the shared folder
    assert "can be written by others" in caplog.text
