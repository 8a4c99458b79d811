"""A development pool of real photographs from Debian packages, split by whole photo into test, dev and train.

:data:`MANIFEST` pins 123 photographs, each chosen by eye (docs/PHOTOS.md). :func:`build_pool` fetches the
pinned ``.deb`` files, unpacks them (``dpkg -x``), verifies every checksum, writes
``ROOT/<hash>/{test,dev,train}/<package>__<name>.jpg`` and ``manifest.json``, and refuses a pool in which a
photo of one split is a near duplicate of a photo of another (a perceptual hash,
:mod:`gn_convert.testing.near_duplicates`). ``test`` is for final scoring only, never for tuning; ``dev`` for
tuning. Usage: ``python scripts/photo_pool.py [--root DIR] [--list] [--check-duplicates]
[--contact-sheet FILE.png]``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from gn_convert.atomic import atomic_file, sweep_stale, terminate_as_exit
from gn_convert.errors import DataError, OutputError
from gn_convert.testing.near_duplicates import MAX_DISTANCE, PhotoHash, cross_split_pairs, near_duplicates, photo_hash

SPLITS = ("test", "dev", "train")
KINDS = ("animal", "indoor", "landscape", "object", "person", "plant", "sky", "urban", "water")
TEST_UNITS, DEV_UNITS = 25, 10  # photos (or groups of photos of one scene) drawn for test and dev
MAX_SIDE, QUALITY, SALT, FORMAT = 512, 92, "gn-convert photo pool v1", "gn-convert-photo-pool/1"


class PhotoPoolError(RuntimeError):
    """The pool cannot be built as pinned; the message is one line that says what to do."""


@dataclass(frozen=True)
class Photo:
    """One curated photograph: ``path`` inside a package build, its pool ``name`` (``<package>__<file>``),
    its ``kind`` (one of :data:`KINDS`, the strata of the split), one-word ``subject`` and ``group``
    (photos of one scene share a group, and so a split)."""

    package: str
    version: str
    path: str
    sha256: str
    kind: str
    subject: str
    group: str
    name: str


# The table (MANIFEST_FILE): "[package version folder]", then per photo: SHA-256, kind, subject, file, optional group.
MANIFEST_FILE = Path(__file__).with_name("photo_pool_manifest.txt")


def parse_manifest(text: str) -> tuple[Photo, ...]:
    """Photos from the table format of :data:`MANIFEST_FILE`; ValueError names every bad line or entry."""
    photos, problems, header = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if line.startswith("#"):
            continue
        if line.startswith("["):
            header = line.strip("[] ").split()
        elif fields and len(header) == 3 and len(fields) in (4, 5):
            stem = PurePosixPath(fields[3]).with_suffix("").as_posix().replace("/", "-")
            photos.append(Photo(header[0], header[1], f"{header[2]}/{fields[3]}", fields[0], fields[1], fields[2],
                                (fields[4:] or [""])[0], f"{header[0]}__{stem}"))
        elif fields:
            problems.append(f"line {number}")
    names = collections.Counter(photo.name for photo in photos)
    problems += [f"{p.package} {p.path}" for p in photos if not re.fullmatch(r"[0-9a-f]{64}", p.sha256)
                 or p.kind not in KINDS or names[p.name] > 1 or not re.fullmatch(r"\w[\w.+-]*", p.name)
                 or ".." in PurePosixPath(p.path).parts or p.path.startswith("/")]
    if problems:
        raise ValueError("photo manifest: bad line, checksum, kind, name or path: " + "; ".join(problems))
    return tuple(photos)


MANIFEST: tuple[Photo, ...] = parse_manifest(MANIFEST_FILE.read_text())


def _apportion(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Largest-remainder shares of ``total`` in proportion to ``sizes`` (ties broken by name)."""
    exact = {key: size * total / max(1, sum(sizes.values())) for key, size in sizes.items()}
    share = {key: math.floor(value) for key, value in exact.items()}
    for key in sorted(exact, key=lambda k: (share[k] - exact[k], k))[: total - sum(share.values())]:
        share[key] += 1
    return share


def split_photos(photos: Sequence[Photo], test: int = TEST_UNITS, dev: int = DEV_UNITS) -> dict[str, str]:
    """Each photo's split by name: whole units (a group, or a photo), stratified by kind, deterministic.

    Each kind's units, ordered by the SHA-256 of :data:`SALT` and their name with packages taking turns,
    give ``test`` then ``dev`` their largest-remainder share of ``test`` and ``dev`` units; ``train`` gets
    the rest. Only the set of photos matters, not their order. Raises PhotoPoolError below ``test + dev + 1``.
    """
    units: dict[str, list[Photo]] = collections.defaultdict(list)
    for photo in photos:
        units[f"group:{photo.group}" if photo.group else photo.name].append(photo)
    if len(units) < test + dev + 1:
        raise PhotoPoolError(f"{len(units)} photos are too few for {test} test, {dev} dev and one training photo")
    strata: dict[str, list] = collections.defaultdict(list)
    taken: collections.Counter = collections.Counter()  # (kind, package) -> units so far: packages alternate
    for unit, members in sorted(units.items(), key=lambda u: hashlib.sha256(f"{SALT}/{u[0]}".encode()).digest()):
        kind = min(photo.kind for photo in members)
        strata[kind].append((taken[kind, members[0].package], unit))
        taken[kind, members[0].package] += 1
    strata = {kind: [unit for _, unit in sorted(members, key=lambda m: m[0])] for kind, members in strata.items()}
    n_test = _apportion({kind: len(members) for kind, members in strata.items()}, test)
    n_dev = _apportion({kind: len(members) - n_test[kind] for kind, members in strata.items()}, dev)
    split_of = {unit: "test" if i < n_test[kind] else "dev" if i < n_test[kind] + n_dev[kind] else "train"
                for kind, members in strata.items() for i, unit in enumerate(members)}
    return {photo.name: split_of[unit] for unit, members in units.items() for photo in members}


def pool_hash(photos: Sequence[Photo], splits: dict[str, str]) -> str:
    """16 hex digits naming a pool: its photos, their splits and the image settings."""
    record = {"format": FORMAT, "max_side": MAX_SIDE, "quality": QUALITY,
              "photos": sorted((asdict(p) | {"split": splits[p.name]} for p in photos), key=lambda d: d["sha256"])}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise PhotoPoolError(f"{command[0]} is not available: fetching needs Debian's apt and dpkg") from err


def download_deb(package: str, version: str, debs: Path) -> Path:
    """The ``.deb`` of ``package`` at exactly ``version`` in ``debs``, by ``apt-get download`` if absent
    (after a failure, ``apt-get update`` and once more). Raises PhotoPoolError if it cannot be had."""
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
    if found := sorted(debs.glob(pattern)):
        return found[0]
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        if (done := _run("apt-get", "download", f"{package}={version}", cwd=Path(tmp))).returncode:
            _run("apt-get", "update")
            done = _run("apt-get", "download", f"{package}={version}", cwd=Path(tmp))
        if done.returncode or not (got := sorted(Path(tmp).glob(pattern))):
            offered = re.search(r"Candidate:\s*(\S+)", _run("apt-cache", "policy", package).stdout)
            why = [line for line in done.stderr.splitlines() if line.startswith("E:")] or ["no .deb"]
            raise PhotoPoolError(
                f"the Debian mirror does not offer {package} {version} (it offers {offered[1] if offered else 'none'}:"
                f" {why[-1]}); the manifest pins that version, so the pool refuses other photos: put"
                f" {package}_{version}_all.deb (snapshot.debian.org keeps old ones) in {debs} or re-curate MANIFEST")
        os.replace(got[0], debs / got[0].name)
    return debs / got[0].name


def unpack_package(package: str, version: str, debs: Path, dest: Path) -> None:
    """Unpack the pinned ``.deb`` of ``package`` into ``dest`` with ``dpkg -x`` (nothing is installed)."""
    deb = download_deb(package, version, debs)
    if _run("dpkg", "-x", str(deb), str(dest)).returncode:
        raise PhotoPoolError(f"dpkg -x {deb} failed: delete that file and rerun")


def verify(photo: Photo, unpacked: Path, debs: Path) -> Path:
    """The photo's file in the unpacked package, once its SHA-256 is the pinned one; else PhotoPoolError."""
    source = unpacked / photo.path
    got = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else "missing"
    if got != photo.sha256:
        raise PhotoPoolError(
            f"{photo.package} {photo.version}: {photo.path} has SHA-256 {got[:16]}, the manifest pins "
            f"{photo.sha256[:16]}: not the pinned package build; delete {debs}/{photo.package}_*.deb and rerun "
            "(another Debian version needs a re-curated MANIFEST, never other photos)")
    return source


def shrink(source: Path, target: Path) -> tuple[int, int]:
    """Write ``source`` as an RGB JPEG (quality 92), shorter side at most 512 px, transparency over white."""
    with Image.open(source) as opened:
        scale = min(1.0, MAX_SIDE / min(opened.size))
        opened.draft("RGB", (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))  # JPEG: faster
        image = ImageOps.exif_transpose(opened).convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    scale = min(1.0, MAX_SIDE / min(image.size))
    if (size := (round(image.width * scale), round(image.height * scale))) != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    image.save(target, "JPEG", quality=QUALITY)
    return image.size


def build_pool(root: str | Path | None = None, photos: Sequence[Photo] | None = None, progress: bool = False) -> Path:
    """Build the pool of ``photos`` (default :data:`MANIFEST`) under ``root``, or find it built (no work).

    ``root`` defaults to ``~/.cache/gn_convert/photo_pool``; ``.deb`` files are kept in ``ROOT/debs``.
    Returns ``ROOT/<hash>``. Raises PhotoPoolError when a package is not to be had at its pinned version or a
    checksum differs: then nothing is left behind but downloaded ``.deb`` files.
    """
    photos = MANIFEST if photos is None else tuple(photos)
    root = Path(root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "gn_convert", "photo_pool"))
    splits = split_photos(photos)
    pool = root.expanduser() / pool_hash(photos, splits)
    if (pool / "manifest.json").is_file():
        if missing := [e["file"] for e in _photos_of(pool) if not (pool / e["file"]).is_file()]:
            raise PhotoPoolError(f"the pool {pool} lacks {len(missing)} files ({missing[0]}...): delete it and rerun")
        return pool
    pool.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(pool)  # what a killed build left
    debs, partial = pool.parent / "debs", pool.with_name(f".{pool.name}.{os.getpid()}.partial")
    packages: dict[tuple[str, str], list[Photo]] = collections.defaultdict(list)
    for photo in photos:
        packages[photo.package, photo.version].append(photo)
    entries = []
    try:
        with terminate_as_exit(), tqdm(total=len(photos), unit="photo", disable=not progress) as bar:
            os.makedirs(partial)
            for (package, version), members in sorted(packages.items()):
                with tempfile.TemporaryDirectory(dir=pool.parent, prefix=f".unpack-{package}-") as unpacked:
                    unpack_package(package, version, debs, Path(unpacked))
                    for photo in members:
                        file = f"{splits[photo.name]}/{photo.name}.jpg"
                        (partial / file).parent.mkdir(exist_ok=True)
                        width, height = shrink(verify(photo, Path(unpacked), debs), partial / file)
                        entries.append({"file": file, "split": splits[photo.name]} | asdict(photo)
                                       | {"width": width, "height": height})
                        bar.update()
            refuse_near_duplicates(partial, entries)
            counts = collections.Counter(entry["split"] for entry in entries)
            record = {"format": FORMAT, "hash": pool.name, "max_side": MAX_SIDE, "quality": QUALITY,
                      "counts": {split: counts[split] for split in SPLITS},
                      "photos": sorted(entries, key=lambda entry: entry["file"])}
            (partial / "manifest.json").write_text(json.dumps(record, indent=1) + "\n")
            if not (pool / "manifest.json").is_file():  # else a concurrent build finished first
                partial.rename(pool)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return pool


def _hashes(pool: Path, entries: Sequence[dict]) -> dict[str, PhotoHash]:
    return {entry["name"]: photo_hash(pool / entry["file"]) for entry in entries}


def refuse_near_duplicates(pool: Path, entries: Sequence[dict]) -> None:
    """Raise PhotoPoolError when a photo of the pool's folder ``pool`` is a near duplicate (within
    :data:`~gn_convert.testing.near_duplicates.MAX_DISTANCE` bits of perceptual hash) of a photo of another
    split: a resized, recompressed or mirrored copy would let a test photo into training."""
    found = near_duplicates(_hashes(pool, entries), {entry["name"]: entry["split"] for entry in entries})
    if found:
        split = {entry["name"]: entry["split"] for entry in entries}
        pairs = "; ".join(f"{p.first} ({split[p.first]}) and {p.second} ({split[p.second]}), {p.distance} bits"
                          for p in found)
        raise PhotoPoolError(f"near-duplicate photos across splits (perceptual hash within {MAX_DISTANCE} of 255 "
                             f"bits): {pairs}; give each such pair one group in the manifest, or drop one photo")


def duplicate_report(pool: Path, shown: int = 3) -> str:
    """The near-duplicate check of a built pool, in words: the nearest pairs across splits and within one, and
    the nearest of the bundled photos (:mod:`gn_convert.testing.photo_sets`, those installed) to the pool's."""
    entries = _photos_of(pool)
    hashes, split = _hashes(pool, entries), {entry["name"]: entry["split"] for entry in entries}
    across = cross_split_pairs(hashes, split)
    within = cross_split_pairs(hashes, {name: name for name in hashes})  # every pair
    within = [pair for pair in within if split[pair.first] == split[pair.second]]
    lines = [f"near duplicates across splits (within {MAX_DISTANCE} of 255 bits): "
             f"{sum(p.distance <= MAX_DISTANCE for p in across)} of {len(across)} pairs",
             *(f"  nearest across splits: {p.distance:3d} bits  {p.first} ({split[p.first]}), {p.second} "
               f"({split[p.second]})" for p in across[:shown]),
             *(f"  nearest within a split: {p.distance:3d} bits  {p.first}, {p.second} ({split[p.first]})"
               for p in within[:1])]
    bundled, missing = _bundled_hashes()
    if bundled:
        pairs = cross_split_pairs(bundled | hashes, {**{n: "bundled" for n in bundled}, **split})
        pairs = [p for p in pairs if (p.first in bundled) != (p.second in bundled)]
        lines += [f"bundled photos against the pool: {sum(p.distance <= MAX_DISTANCE for p in pairs)} of "
                  f"{len(pairs)} pairs within {MAX_DISTANCE} bits",
                  *(f"  nearest: {p.distance:3d} bits  {p.first}, {p.second}" for p in pairs[:shown])]
    if missing:
        lines.append(f"  not compared (not installed): {', '.join(missing)}")
    return "\n".join(lines)


def _bundled_hashes() -> tuple[dict[str, PhotoHash], list[str]]:
    """The hashes of the photos of :mod:`gn_convert.testing.photo_sets` that can be loaded here, and the names
    of those that cannot (scikit-image not installed)."""
    from gn_convert.testing.photo_sets import HELDOUT_PHOTOS, TRAIN_PHOTOS, photo

    hashes, missing = {}, []
    for name in TRAIN_PHOTOS + HELDOUT_PHOTOS:
        try:
            pixels = photo(name).mul(255).round().byte().permute(1, 2, 0).numpy()
        except DataError:
            missing.append(name)
            continue
        hashes[f"bundled__{name}"] = photo_hash(Image.fromarray(pixels))
    return hashes, missing


def _photos_of(pool: Path) -> list[dict]:
    return json.loads((pool / "manifest.json").read_text())["photos"]


def describe(pool: Path) -> str:
    """The pool's table: per split, its photos, kinds, subjects and source packages; then its folder."""
    entries, lines = _photos_of(pool), [f"{'split':<6}{'photos':>6}  kinds / subjects / packages"]
    for split in SPLITS:
        chosen = [entry for entry in entries if entry["split"] == split]
        for label in ("kind", "subject", "package"):
            counts = sorted(collections.Counter(entry[label] for entry in chosen).items())
            text = f"{label}s: " + ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts)
            lines += textwrap.wrap(text, 112, initial_indent=f"{split:<6}{len(chosen):>6}  " if label == "kind"
                                   else " " * 14, subsequent_indent=" " * 16, break_on_hyphens=False)
    return "\n".join(lines + [f"{len(entries)} photos in {pool}"])


def list_manifest(photos: Sequence[Photo] | None = None) -> str:
    """One line per curated photo: split, kind, subject, package, version, path and SHA-256."""
    photos = MANIFEST if photos is None else tuple(photos)
    splits = split_photos(photos)
    return "\n".join(f"{splits[p.name]:<5} {p.kind:<9} {p.subject:<10} {p.package} {p.version} {p.path} {p.sha256}"
                     for p in sorted(photos, key=lambda p: (SPLITS.index(splits[p.name]), p.kind, p.name)))


def contact_sheet(pool: Path, out: str | Path, cell: int = 160, columns: int = 10) -> Path:
    """Write a PNG of every photo of the pool, test then dev then train, each labelled with its split."""
    entries = sorted(_photos_of(pool), key=lambda entry: (SPLITS.index(entry["split"]), entry["file"]))
    sheet = Image.new("RGB", (columns * cell, math.ceil(len(entries) / columns) * (cell + 26)), "white")
    draw, colours = ImageDraw.Draw(sheet), {"test": "red", "dev": "blue", "train": "black"}
    for i, entry in enumerate(entries):
        x, y = (i % columns) * cell, (i // columns) * (cell + 26)
        with Image.open(pool / entry["file"]) as image:
            image.thumbnail((cell - 4, cell - 4))
            sheet.paste(image, (x + 2, y + 2))
        draw.text((x + 2, y + cell), f"{entry['split'].upper()} {entry['kind']}: {entry['subject']}",
                  fill=colours[entry["split"]])
        draw.text((x + 2, y + cell + 12), entry["name"].split("__")[1][:26], fill="dimgray")
    with atomic_file(out) as tmp:
        sheet.save(tmp, "PNG")
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: build (or find) the pool and print its table; returns the exit status."""
    parser = argparse.ArgumentParser(description="Build (or find) the development photo pool; print its table.")
    parser.add_argument("--root", type=Path, help="cache root (default ~/.cache/gn_convert/photo_pool)")
    parser.add_argument("--list", action="store_true", help="print the curated manifest with each photo's split")
    parser.add_argument("--contact-sheet", type=Path, metavar="FILE.png", help="write a contact sheet of the pool")
    parser.add_argument("--check-duplicates", action="store_true",
                        help="print the near-duplicate check (perceptual hash): the nearest pairs across splits, "
                        "within a split, and against the bundled scikit-image/scikit-learn photos")
    args = parser.parse_args(argv)
    if args.list:
        print(list_manifest())
        return 0
    try:
        pool = build_pool(args.root, progress=sys.stderr.isatty())
        sheet = contact_sheet(pool, args.contact_sheet) if args.contact_sheet else None
    except (PhotoPoolError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(describe(pool) + (f"\ncontact sheet: {sheet}" if sheet else ""))
    if args.check_duplicates:
        print(duplicate_report(pool))
    return 0


if __name__ == "__main__":
    sys.exit(main())
