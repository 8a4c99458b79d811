"""``scripts/photo_pool.py``: the curated manifest, the split, and a pool built from fake packages.

No test touches the network or ``~/.cache``: packages are folders of generated images in ``tmp_path``
that a monkeypatched ``unpack_package`` copies (one test builds a real ``.deb`` with ``dpkg-deb`` and
unpacks it with the script's own ``dpkg -x`` path). The near-duplicate check runs on real photographs that
ship inside installed packages (scikit-learn's two, matplotlib's Grace Hopper) and copies of them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gn_convert.testing import near_duplicates as nd
from helpers.scripts import load_script

pp = load_script("photo_pool")
FOLDER = "usr/share/backgrounds"
PACKAGES = {"fake-a": "1.0-1", "fake-b": "2:3.1-1"}
KINDS = ("animal", "plant", "urban", "water")


def _write_image(path: Path, index: int) -> None:
    """A small random image; photo 0 is a large JPEG, photo 1 a PNG with a transparent corner."""
    rng = np.random.default_rng(index)
    size = (1100, 700) if index == 0 else (700, 600) if index == 1 else (64 + index, 48)
    pixels = rng.integers(0, 256, (size[1], size[0], 4 if index == 1 else 3), dtype=np.uint8)
    if index == 1:
        pixels[..., 3] = 255
        pixels[:10, :10, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def fake(tmp_path: Path) -> tuple[tuple, Path]:
    """40 photos in two fake packages (24 and 16), four kinds, one group of two; their source tree."""
    source, lines = tmp_path / "packages", []
    for package, version in PACKAGES.items():
        lines.append(f"[{package} {version} {FOLDER}]")
        for i in range(24 if package == "fake-a" else 16):
            index = i if package == "fake-a" else 100 + i
            file = f"sub/p{i:02d}.png" if index == 1 else f"p{i:02d}.jpg"
            _write_image(source / package / FOLDER / file, index)
            sha = hashlib.sha256((source / package / FOLDER / file).read_bytes()).hexdigest()
            group = " pair" if package == "fake-b" and i < 2 else ""
            lines.append(f"{sha} {KINDS[i % 4]} thing{i} {file}{group}")
    return pp.parse_manifest("\n".join(lines)), source


@pytest.fixture
def fake_unpack(monkeypatch: pytest.MonkeyPatch, fake: tuple[tuple, Path]) -> list[str]:
    """``unpack_package`` copies the fake package's tree; returns the packages it was called for."""
    calls: list[str] = []

    def unpack(package: str, version: str, debs: Path, dest: Path) -> None:
        assert version == PACKAGES[package]
        calls.append(package)
        shutil.copytree(fake[1] / package, dest, dirs_exist_ok=True)

    monkeypatch.setattr(pp, "unpack_package", unpack)
    return calls


def test_real_manifest_pins_123_photos_of_seven_packages() -> None:
    photos = pp.MANIFEST
    versions = collections.defaultdict(set)
    for photo in photos:
        versions[photo.package].add(photo.version)
    assert len(photos) == 123 and len({p.name for p in photos}) == 123 and len({p.sha256 for p in photos}) == 123
    assert {package: v.pop() for package, v in versions.items() if len(v) == 1} == {
        "lomiri-wallpapers-16.04": "20.04.0-2", "lomiri-wallpapers-20.04": "20.04.0-2",
        "mate-backgrounds": "1.26.0-1", "plasma-workspace-wallpapers": "4:5.27.5-2", "lxqt-themes": "1.2.0-1",
        "opencv-doc": "4.6.0+dfsg-12", "scratch": "1.4.0.6~dfsg1-6.1"}
    assert collections.Counter(p.package for p in photos) == {
        "scratch": 48, "opencv-doc": 27, "lomiri-wallpapers-16.04": 13, "mate-backgrounds": 12,
        "plasma-workspace-wallpapers": 11, "lxqt-themes": 11, "lomiri-wallpapers-20.04": 1}


def test_real_split_is_25_test_10_dev_88_train_spread_over_kinds() -> None:
    splits = pp.split_photos(pp.MANIFEST)
    assert collections.Counter(splits.values()) == {"test": 25, "dev": 10, "train": 88}
    for split, least_kinds in (("test", 8), ("dev", 7), ("train", 9)):
        kinds = collections.Counter(p.kind for p in pp.MANIFEST if splits[p.name] == split)
        assert len(kinds) == least_kinds and max(kinds.values()) <= 0.3 * sum(kinds.values())
    assert len({p.subject for p in pp.MANIFEST if splits[p.name] == "test"}) == 25  # all different
    assert len({p.package for p in pp.MANIFEST if splits[p.name] == "test"}) == 6
    assert len({p.package for p in pp.MANIFEST if splits[p.name] == "dev"}) == 6
    boston = {splits[p.name] for p in pp.MANIFEST if p.group == "boston"}
    assert len(boston) == 1  # the two photos of one skyline share a split


def test_split_is_deterministic_and_ignores_order() -> None:
    shuffled = list(pp.MANIFEST)
    random.Random(0).shuffle(shuffled)
    first = pp.split_photos(pp.MANIFEST)
    assert pp.split_photos(shuffled) == first == pp.split_photos(tuple(reversed(pp.MANIFEST)))
    assert pp.pool_hash(shuffled, first) == pp.pool_hash(pp.MANIFEST, first)


@pytest.mark.parametrize("salt", [f"salt {i}" for i in range(12)])
def test_split_keeps_groups_whole_and_counts_exact(monkeypatch: pytest.MonkeyPatch, fake: tuple, salt: str) -> None:
    monkeypatch.setattr(pp, "SALT", salt)
    photos = fake[0]
    splits = pp.split_photos(photos)
    pair = [splits[p.name] for p in photos if p.group == "pair"]
    units = collections.Counter(s for p, s in ((p, splits[p.name]) for p in photos) if p.group != "pair")
    units[pair[0]] += 1
    assert len(pair) == 2 and pair[0] == pair[1]
    assert units == {"test": 25, "dev": 10, "train": 4}  # 39 units: 38 photos and one group
    assert set(splits) == {p.name for p in photos}  # every photo in exactly one split


def test_split_refuses_too_few_photos_in_one_line(fake: tuple) -> None:
    with pytest.raises(pp.PhotoPoolError, match=r"^10 photos are too few for 25 test, 10 dev") as err:
        pp.split_photos(fake[0][:10])
    assert "\n" not in str(err.value)


def test_parse_manifest_names_every_bad_entry() -> None:
    table = "[p 1 usr]\n" + "0" * 64 + " animal cat a.jpg\n" + "0" * 63 + " animal cat b.jpg\n" + \
            "0" * 64 + " robot cat c.jpg\n" + "0" * 64 + " animal cat ../d.jpg\nnot-a-photo line\n"
    with pytest.raises(ValueError) as err:
        pp.parse_manifest(table)
    assert "line 6" in str(err.value) and "usr/b.jpg" in str(err.value) and "usr/c.jpg" in str(err.value)
    assert "usr/../d.jpg" in str(err.value) and "usr/a.jpg" not in str(err.value)


def test_build_writes_a_complete_pool(tmp_path: Path, fake: tuple, fake_unpack: list[str]) -> None:
    root = tmp_path / "cache"
    pool = pp.build_pool(root, fake[0])
    record = json.loads((pool / "manifest.json").read_text())
    splits = pp.split_photos(fake[0])
    assert pool == root / pp.pool_hash(fake[0], splits) and record["hash"] == pool.name
    assert sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*") if p.is_file()) == \
        sorted([entry["file"] for entry in record["photos"]] + ["manifest.json"])
    assert record["counts"] == {"test": 26, "dev": 10, "train": 4}  # the pair drew test
    by_name = {entry["name"]: entry for entry in record["photos"]}
    for photo in fake[0]:
        entry = by_name[photo.name]
        assert entry["file"] == f"{splits[photo.name]}/{photo.name}.jpg" and entry["sha256"] == photo.sha256
        assert (entry["package"], entry["version"], entry["path"]) == (photo.package, photo.version, photo.path)
        with Image.open(pool / entry["file"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (entry["width"], entry["height"])
    assert (by_name["fake-a__p00"]["width"], by_name["fake-a__p00"]["height"]) == (805, 512)  # 1100x700 source
    assert (by_name["fake-a__sub-p01"]["width"], by_name["fake-a__sub-p01"]["height"]) == (597, 512)
    with Image.open(pool / by_name["fake-a__sub-p01"]["file"]) as image:
        assert min(image.getpixel((2, 2))) > 240  # the transparent corner is white
    assert (by_name["fake-b__p05"]["width"], by_name["fake-b__p05"]["height"]) == (169, 48)  # never enlarged
    assert sorted(fake_unpack) == ["fake-a", "fake-b"] and sorted(root.iterdir()) == [pool]


def test_a_changed_file_is_refused_in_one_line_and_leaves_nothing(tmp_path: Path, fake: tuple,
                                                                  fake_unpack: list[str]) -> None:
    changed = fake[1] / "fake-b" / FOLDER / "p03.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    root = tmp_path / "cache"
    with pytest.raises(pp.PhotoPoolError) as err:
        pp.build_pool(root, fake[0])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"fake-b 2:3.1-1: {FOLDER}/p03.jpg has SHA-256 ")
    assert "not the pinned package build; delete" in message and "fake-b_*.deb and rerun" in message
    assert list(root.iterdir()) == []


def test_a_failure_midway_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: tuple,
                                         fake_unpack: list[str]) -> None:
    real_shrink = pp.shrink
    done: list[Path] = []

    def shrink_then_fail(source: Path, target: Path) -> tuple[int, int]:
        if len(done) == 30:
            raise OSError("disk full")
        done.append(target)
        return real_shrink(source, target)

    monkeypatch.setattr(pp, "shrink", shrink_then_fail)
    root = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        pp.build_pool(root, fake[0])
    assert len(done) == 30 and not any(path.exists() for path in done)
    assert list(root.iterdir()) == []  # no pool, no partial folder, no unpacked package


def test_a_cached_second_run_does_no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: tuple,
                                          fake_unpack: list[str]) -> None:
    pool = pp.build_pool(tmp_path / "cache", fake[0])
    stamps = {path: path.stat().st_mtime_ns for path in pool.rglob("*")}

    def refuse(*args: object) -> None:
        raise AssertionError("a cached run must not fetch, unpack or convert")

    for name in ("unpack_package", "download_deb", "shrink", "verify"):
        monkeypatch.setattr(pp, name, refuse)
    assert pp.build_pool(tmp_path / "cache", fake[0]) == pool
    assert {path: path.stat().st_mtime_ns for path in pool.rglob("*")} == stamps
    next(pool.glob("train/*.jpg")).unlink()
    with pytest.raises(pp.PhotoPoolError, match=r"lacks 1 files .*: delete it and rerun$"):
        pp.build_pool(tmp_path / "cache", fake[0])


def test_what_a_killed_build_left_is_swept(tmp_path: Path, fake: tuple, fake_unpack: list[str]) -> None:
    name = pp.pool_hash(fake[0], pp.split_photos(fake[0]))
    stale = tmp_path / "cache" / f".{name}.999999999.partial"  # no such process
    (stale / "test").mkdir(parents=True)
    pool = pp.build_pool(tmp_path / "cache", fake[0])
    assert not stale.exists() and sorted((tmp_path / "cache").iterdir()) == [pool]


def _fake_apt(calls: list[tuple[str, ...]]):
    def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        calls.append(command)
        if command[:2] == ("apt-cache", "policy"):
            return subprocess.CompletedProcess(command, 0, "fake-a:\n  Installed: (none)\n  Candidate: 1.1-1\n", "")
        if command[:2] == ("apt-get", "download"):
            return subprocess.CompletedProcess(command, 100, "", "E: Version '1.0-1' for 'fake-a' was not found\n")
        return subprocess.CompletedProcess(command, 0, "", "")
    return run


def test_a_version_the_mirror_no_longer_offers_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(pp, "_run", _fake_apt(calls))
    with pytest.raises(pp.PhotoPoolError) as err:
        pp.download_deb("fake-a", "1.0-1", tmp_path / "debs")
    message = str(err.value)
    assert "\n" not in message and message.startswith("the Debian mirror does not offer fake-a 1.0-1 (it offers 1.1-1:")
    assert "E: Version '1.0-1' for 'fake-a' was not found" in message and "the pool refuses other photos" in message
    assert [c[:2] for c in calls] == [("apt-get", "download"), ("apt-get", "update"), ("apt-get", "download"),
                                      ("apt-cache", "policy")]
    assert calls[0][2] == "fake-a=1.0-1" and list((tmp_path / "debs").iterdir()) == []


def test_a_downloaded_deb_is_used_without_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deb = tmp_path / "fake-b_2%3a3.1-1_all.deb"  # apt-get download's name for epoch 2
    deb.write_bytes(b"")
    (tmp_path / "fake-b_2%3a3.2-1_all.deb").write_bytes(b"")
    monkeypatch.setattr(pp, "_run", lambda *a, **k: pytest.fail("apt must not run"))
    assert pp.download_deb("fake-b", "2:3.1-1", tmp_path) == deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a .deb")
def test_a_real_deb_is_unpacked_with_dpkg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: tuple) -> None:
    debs = tmp_path / "cache" / "debs"
    debs.mkdir(parents=True)
    for package, version in PACKAGES.items():
        tree = tmp_path / "deb" / package
        shutil.copytree(fake[1] / package, tree)
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
                                                 "Maintainer: t <t@example.org>\nDescription: fake photos\n")
        deb = debs / f"{package}_{version.replace(':', '%3a')}_all.deb"
        subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(tree), str(deb)], check=True, capture_output=True)
    monkeypatch.setattr(pp, "_run", lambda *c, **k: subprocess.run(c, check=False, capture_output=True, text=True)
                        if c[0] == "dpkg" else pytest.fail("apt must not run"))
    pool = pp.build_pool(tmp_path / "cache", fake[0])
    assert len(list(pool.rglob("*.jpg"))) == 40
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(["debs", pool.name])


def test_cli_prints_the_table_lists_and_draws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: tuple,
                                              fake_unpack: list[str], capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(pp, "MANIFEST", fake[0])
    sheet = tmp_path / "sheet.png"
    assert pp.main(["--root", str(tmp_path / "cache"), "--contact-sheet", str(sheet)]) == 0
    out = capsys.readouterr().out.splitlines()
    pool = pp.build_pool(tmp_path / "cache", fake[0])
    assert out[1].startswith("test      26  kinds: animal x7, plant x7") and out[-2:] == [f"40 photos in {pool}",
                                                                            f"contact sheet: {sheet}"]
    assert any(line.strip().startswith("packages: fake-a") for line in out)
    with Image.open(sheet) as image:
        assert image.size == (1600, 4 * 186)
    assert pp.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 40 and [line.split()[0] for line in listed] == ["test"] * 26 + ["dev"] * 10 + ["train"] * 4
    changed = fake[1] / "fake-a" / FOLDER / "p07.jpg"
    changed.write_bytes(b"x")
    assert pp.main(["--root", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: fake-a 1.0-1: usr/share/backgrounds/p07.jpg has SHA-256") and err.count("\n") == 1
    assert os.listdir(tmp_path / "other") == []


def _real_photos() -> dict[str, Image.Image]:
    """Real photographs that ship inside installed packages: scikit-learn's two, matplotlib's Grace Hopper."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    photos = {name: Image.fromarray(pixels) for name, pixels in
              zip(("china", "flower"), sklearn_datasets.load_sample_images().images, strict=True)}
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file, Image.open(file) as opened:
            photos["hopper"] = opened.convert("RGB")
    except (ImportError, OSError):
        pass
    return photos


def _copy(image: Image.Image, scale: float = 0.5, quality: int = 50, mirror: bool = False) -> Image.Image:
    """A near duplicate: ``image`` resized, mirrored if asked, and recompressed as JPEG."""
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else image
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=quality)
    return Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")


@pytest.mark.parametrize("mirror", [False, True])
def test_a_resized_recompressed_copy_of_a_real_photo_across_splits_is_a_near_duplicate(mirror: bool) -> None:
    photos = _real_photos()
    hashes = {name: nd.photo_hash(image) for name, image in photos.items()}
    split = {name: "test" if name == "flower" else "train" for name in photos}
    assert nd.near_duplicates(hashes, split) == []  # distinct photos are far apart
    assert min(p.distance for p in nd.cross_split_pairs(hashes, split)) > nd.MAX_DISTANCE + 32
    hashes["flower_copy"] = nd.photo_hash(_copy(photos["flower"], mirror=mirror))
    split["flower_copy"] = "train"
    found = nd.near_duplicates(hashes, split)
    assert [(p.first, p.second) for p in found] == [("flower", "flower_copy")] and found[0].distance <= 10
    split["flower_copy"] = "test"  # in the same split as its original it is no leak
    assert nd.near_duplicates(hashes, split) == []


def test_the_pool_refuses_a_near_duplicate_across_splits_and_leaves_nothing(tmp_path: Path, fake: tuple,
                                                                             fake_unpack: list[str]) -> None:
    photos, source = fake
    splits = pp.split_photos(photos)
    test_photo = next(p for p in photos if splits[p.name] == "test" and not p.group)
    train_photo = next(p for p in photos if splits[p.name] == "train" and not p.group)
    real = _real_photos()

    def put(photo: object, image: Image.Image) -> object:  # the image at the photo's path, the manifest pinning it
        path = source / photo.package / photo.path
        image.save(path, "PNG" if path.suffix == ".png" else "JPEG", quality=95)
        return dataclasses.replace(photo, sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    replaced = {test_photo.name: put(test_photo, real["china"]), train_photo.name: put(train_photo, real["flower"])}
    distinct = tuple(replaced.get(p.name, p) for p in photos)
    assert pp.build_pool(tmp_path / "distinct", distinct).is_dir()  # two real, different photos pass
    replaced[train_photo.name] = put(train_photo, _copy(real["china"], scale=0.6, quality=40))
    copied = tuple(replaced.get(p.name, p) for p in photos)
    with pytest.raises(pp.PhotoPoolError) as err:
        pp.build_pool(tmp_path / "copied", copied)
    message = str(err.value)
    assert "\n" not in message and message.startswith("near-duplicate photos across splits")
    assert f"{test_photo.name} (test)" in message and f"{train_photo.name} (train)" in message
    assert list((tmp_path / "copied").iterdir()) == []  # no pool, no partial folder


def test_check_duplicates_reports_the_nearest_pairs(tmp_path: Path, fake: tuple, fake_unpack: list[str],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(pp, "MANIFEST", fake[0])
    assert pp.main(["--root", str(tmp_path / "cache"), "--check-duplicates"]) == 0
    out = capsys.readouterr().out
    assert f"near duplicates across splits (within {nd.MAX_DISTANCE} of 255 bits): 0 of " in out
    assert out.count("  nearest across splits: ") == 3 and "  nearest within a split: " in out
