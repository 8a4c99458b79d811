"""A development pool of real photographs from Debian packages, split by whole photo into test, dev and train.

:data:`MANIFEST` pins 123 photographs, each chosen by eye (docs/PHOTOS.md). :func:`build_pool` fetches the
pinned ``.deb`` files, unpacks them (``dpkg -x``), verifies every checksum and writes
``ROOT/<hash>/{test,dev,train}/<package>__<name>.jpg`` and ``manifest.json``. ``test`` is for final scoring
only, never for tuning; ``dev`` for tuning. Usage: ``python scripts/photo_pool.py [--root DIR] [--list]
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
from gn_convert.errors import OutputError

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


# "[package version folder]", then per photo: SHA-256, kind, subject, file (in that folder), optional group.
_MANIFEST_TABLE = """
[lomiri-wallpapers-16.04 20.04.0-2 usr/share/backgrounds]
bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050 urban bridge Bridge_by_Sander_Klootwijk.jpg
af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3 animal dragonfly Dragonfly_by_Bolly.jpg
c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad object fig Picture_0B_by_freespace.jpg
89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b object brushes Picture_1A_by_freespace.jpg
d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74 indoor room Wine_by_Jakkub_Mede.jpg
66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36 landscape mountain aitzgorri_by_Aitzol_Berasategi.jpg
85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373 object lamp free_by_Peter_Nerlich.jpg
cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d animal dog friends_by_Aitzol_Berasategi.jpg
e7b20e2db9dcd6e2b278ca55873c2110b35d89cd38b04d0b18728726888e6889 object clock greentock_by_Peter_Nerlich.jpg
4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05 water stream life_by_Aitzol_Berasategi.jpg
414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a landscape mountain picosdeeuropa_by_Aitzol_Berasategi.jpg
a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f plant dandelion seeding_by_Clements_Engelhardt.jpg
474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18 sky sunset sunset_by_Aitzol_Berasategi.jpg
[lomiri-wallpapers-20.04 20.04.0-2 usr/share/backgrounds]
6572410c09f4492c74ccadde133565a14c0161617d5917d4c820c66d65a44ba7 animal nuthatch Kleiber_by_Lukas_Baubkus.jpg
[mate-backgrounds 1.26.0-1 usr/share/backgrounds/mate/nature]
5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce water droplet Aqua.jpg
f7aac0dcc2e06d0491643e84df3da1d9db7c4610f58806a880d56e074799f600 plant leaf Blinds.jpg
8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91 landscape dune Dune.jpg
972b0a0c4e5e3fa93f4f244fc84bc64b121a5eac3aaa5856f1308c1f38a02f8e plant flower FreshFlower.jpg
d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78 plant marigold Garden.jpg
8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832 plant grass GreenMeadow.jpg
e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d animal ladybird LadyBird.jpg
3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16 plant leaf RainDrops.jpg
77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957 sky storm Storm.jpg
665e5abf8a5399070a91a9a8e455fe071e5b61697ff78fdeda4e9843ef545aeb plant seeds TwoWings.jpg
19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07 object planks Wood.jpg
254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306 plant flower YellowFlower.jpg
[plasma-workspace-wallpapers 4:5.27.5-2 usr/share/wallpapers]
c272434ef39f2abf1ed48a15a8910088020f3165329a5092f3940ec9464bc05f water jetty BytheWater/contents/images/2560x1600.jpg
05bef6722fc0ed81292cceb3ed026c38d17e510f3c84be7d68610c2b1a723c3f water pier ColdRipple/contents/images/2560x1600.jpg
6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d object cups ColorfulCups/contents/images/2560x1600.jpg
8e3703fae3a3c217b1fc2b399b706cd3720584268d071ba153e4809daa55f1ce water lake DarkestHour/contents/images/2560x1600.jpg
586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a water boats EveningGlow/contents/images/2560x1600.jpg
95603a6560c7e8d50e0e03b3f4adbe39c5258c72528e74e4ecaea1daf4e499de plant leaf FallenLeaf/contents/images/2560x1600.jpg
88c31d8944b7e6935d1b9a296654c692f0772cb512491713eb30a972a604c0ed urban facade Grey/contents/images/2560x1600.jpg
bdca288ce296a981e80659c021cf707caddc702c0c8d4247e60bd618476d47f8 sky kite Kite/contents/images/2560x1600.jpg
cb507baf1dafdcae362264f3aba9483ed4be5f6c9fdd770f0ec0920c6d9e80fd plant moss OneStandsOut/contents/images/2560x1600.jpg
7477457d7f17b736259f1b021864778ad4ba802cf3214e6728181ff29126bba8 landscape forest Path/contents/images/2560x1600.jpg
c868b50789591dd42910153c768053f1ba0a98cb36bbfc2b7a96a1045d0477f8 water lake summer_1am/contents/images/2560x1600.jpg
[lxqt-themes 1.2.0-1 usr/share/lxqt/wallpapers]
c237c26f6f0b18db3afa62a0eff13cb8208b79a1ef35aaadcb745d8f9faef146 animal butterfly Butterfly-Kenneth-Wimer.jpg
f2d275c51d116942cea8e7d80d30c7d3c130349a0695caf2aa235f926ae15759 landscape mountain Valendas.png
e6cb8b3e09b904cc493ff17fddcd564d4e46a1761d05adf972c285a1fd878234 sky clouds after-the-rain.jpg
bae8a8eb8274b29509f1cbbfe250081331c5704a1fea25d5052166a0451e67f3 plant blossom appleflower.png
3d199194b048cb793c0ad558337cda3e16f14cd054168d1d813620e24a0a5659 sky clouds beam.png
13175434d99075e075de7321942e66169e3c99ac9416024dcf4123bd3b38749c animal butterfly butterfly.png
522dbf79dfaff751cf8ef2f337c9d196a231fa096bc38806a76ce048b8c7b5a2 sky clouds cloud.png
3b726aea9a6f8af36431c6f1974f982f7f4c5a4443499500bda31be27e4ffde8 plant droplet drop.png
3a935d8be4d6c9784f9079ff2814acd2de2c8406e9fe584be03e90264f37c371 plant meadow flowers.png
a8235344ee6b5ab1b6de3ccef731bcc0e6509cf33ce832db87eae1eb75987083 landscape fog fog.jpg
2d885e0438c0ab244f818d33d8f745a1cc486558462faf9bf3948675c68ac227 landscape hills this-is-not-windows.jpg
[opencv-doc 4.6.0+dfsg-12 usr/share/doc/opencv-doc/examples]
d9a69191f6e3642ea361bc3c62e677b2f40fe6534b78da540f4155e0734b59ef urban aerial data/aero1.jpg
cce5736808efe80d9f04b118dbb978c344d4345672b332718c3e039a3eeb8eee plant aloe data/aloeL.jpg
e86879de3d9a807dedc742a8f464f39e6b74bbb531a1fba3583155d94997d1cd object apple data/apple.jpg
1a1dd18d78eec44420af3b0b7f08ee3d41c982916cae3ce203d7ff35d754cc0f animal baboon data/baboon.jpg
4c9a24ba67138ad5486d550f586cc5dd1161be112f1c1bea336d6c550cdf255f object circuit data/board.jpg
742a1baad62ac82e91e718e77eedf7e85c2eddc4badfb8c87c6cbc86c45a8b07 urban building data/building.jpg
34a99716b78ded10eae87b4880de739d3e68cc7dd1a96812bb28f469d5eeaea8 animal butterfly data/butterfly.jpg
b55798b35e2dcb24675f0865a2442d0e4887eeb6aff322ecb1968d936cc23e7f object notebook data/ela_original.jpg
9c031d80a1c52da5eca790db896baffec6a7e52bf786cdb7bbfca5c7f880e6a1 object fruit data/fruits.jpg
23b8cf46a1965d0ec33459b875aed43187802834db49e0daa9fa2cc842e9d8d2 urban palace data/home.jpg
b2977cdbd9fb3f94dadd6f76cf586d145676deb8a22b5f0f42149d21c058c09f urban street data/leuvenA.jpg
1d570e49654e84c7a943918537bd9e5e1ef82920152e147c834006e235be97c9 person footballer data/messi5.jpg
152c20d2f380ac985de25e474e1a5f06ed34b932191342099b8272a63a15a079 object orange data/orange.jpg
20bb6e8ae96918a36c9886b6d48e54eedeb3948591e1485c206bc1dc60c8dc8b animal squirrel data/squirrel_cls.jpg
21cd00afbdd0727f445dd91c0a09633e6345ed5b05a3d2355453a1f3c314c6c5 object desk data/stuff.jpg
4d2cf040de084fd3f34d5e3f96f1251faaa4787c1ac3b548fec5809a0d01854e animal dog data/chicky_512.png
eb312435369dac9efcc92f7e098edbd9ed8d7e6dfede8b3b4d8e3702cd80b796 object toys data/rubberwhale1.png
ba06f6701f7260998b430c39b6557f775497e6ce7b1a74f0b7ea6af371bf54a6 person players data/basketball1.png
8b0225ff76244a42bd1400c0904f8b7afea7d97b7d8115495e42e98ad347bd51 object groceries data/box_in_scene.png
e4fec7e2e67a8a425b512dc32452825655b11c7fa83326ae509c5c7ab138da9a animal robin hfs/data/000.jpg
4bcbe0927a8b50f2487463894328da66cddf37f2daa88448258b72892d1f7a23 water lake hfs/data/001.jpg
21b07a5287dec0306846191abf720c352e57b2c6b42bb30885c9deb02664ada7 plant tree hfs/data/002.jpg
9928b44eee0d1d7ab2ffd9d6d80bbbff962d6e85c7786de2cd3c97fe72229186 plant houseplant alphamat/input_images/plant.jpg
7f3041a7019ab4d33d2452bc757d8c4f38616bfde71431e12f7ec370d7b2018e urban sign text/scenetext01.jpg
cadf4a3d29a7ba6fe976b53fa65f490cc2868375e8feb3d93f26029f05c662ca urban arcade text/scenetext03.jpg
205d424fb53bc9a2d62d03e16a33f70d8609d4602e06194cf6218a3666226512 urban house reg/home.png
1c50e61afddd60ebb3829d85187f4e46c9eb8fd8249237ddf0c8904a3286598d animal butterfly dnn_superres/butterfly.png
[scratch 1.4.0.6~dfsg1-6.1 usr/share/scratch/Media/Backgrounds]
d3c3510686181920c83c9cf29c3579a9dc33a0a694833afed66fa9de2becce09 indoor classroom Indoors/chalkboard.jpg
1f0cce2cb9743d7e41fde7cc66d95371ff77a48d0b29c84bcfd3170d25ba8106 indoor store Indoors/clothing-store.jpg
31320a5aa739d6dbcf7339e9885e44a26375cb805972d8ccd2fb55af2dff2b93 indoor hallway Indoors/hall.jpg
b50e1cdc7cac868af8f07e85f1c2e10b40c351337ca5ab8e27577600d5c8b5b4 indoor kitchen Indoors/kitchen.jpg
f567d8e0b693effb6c7e749ffc488acd8dc38641d0250daea11d09ca58588ae5 indoor cinema Indoors/the-movies-inside.jpg
13ecd1022ff35a5d817054ccf86749bc7229b990da104e00cbe74b15daff7a1b water beach Nature/beach-malibu.jpg
f63f68845f52993ad24748f559d29d09fed4ad62a56681df98b3db3a13a0c34c landscape canyon Nature/canyon.jpg
087a86ed0ef4cf69237d4b16e0816f59c2ce67b693e8d12d413c4066de67234a plant flowerbed Nature/flower-bed.jpg
c4176201e98934611b1b31270897fc23c82c55f9a59b81af75cf6b0c2757e54c landscape birches Nature/forest.jpg
5beb88e795dc1e25d4aee44e344c31c1b8c456234c6ae3c4dbfd9d46b8a9a813 landscape boulder Nature/garden-rock.jpg
f121a138f0eb7645752c201c3318065fc2ea1e50272bfbd878531037b00c08c2 landscape canyon Nature/grand-canyon.jpg
54d7b2308eb4e6d5f86aed23d9b434f46553ed711219933311ed97950b722ec9 landscape desert Nature/gravel-desert.jpg
9c41784b792b117b032f0054e1c00371d4dae5cd077b8b805d099e355cdad8e9 landscape coast Nature/hill.jpg
398c72f0bfb8d6f5cf25b00d046201868fbec33c3e7a3e713f50c3f427d45539 water pond Nature/lake.jpg
3a59b42d361c74f0b0aa879512fcde80840f276ea4663bb7f9d48f591e5de22b landscape moon Nature/moon.jpg
a26c8ebd2305c20b2ba1524313d0cbf85229ec3c9fab72e58056a83c74e9b6a0 plant pergola Nature/pathway.jpg
5d53475c1d67c44fe60db107844cd33988a6f80d2ba9ac38fa1c663ccdd526a1 plant tree Nature/tree.jpg
e5aa04ee2649320b796c38f397479806e237951f2132695e3573c982b204b853 water stream Nature/water-and-rocks.jpg
120af0b7846c26f3fa23340f646d9bf3ebd60e293b1ae98ce4b47305c35aa306 water wave Nature/wave.jpg
65e7285b2671bdcf9a13ddca77aa8c7055a315d69a6412ab80a7d5847472404c urban park Outdoors/all-sports-mural.jpg
b4c35a6c9d5e5243df537dd674d784e9f8944308a2ce77cc4e4dce49b2c5ca94 urban playground Outdoors/atom-playground.jpg
b3cf022ad65e8b0fe837214bedf378532a068e19a0bb28081ec255adc4341170 urban bench Outdoors/bench-with-view.jpg
5a004a91d9dee2324a9df6d828b9c6b64229442530d8bc7e627b1a909a121146 water boardwalk Outdoors/boardwalk.jpg
2a0d7d1f1244d25debe2a7a9b023174976ec5d50c117c55efee15da6df87cf41 urban stairs Outdoors/brick-wall-and-stairs.jpg
cd0c5295a31f0d2d48dd3229c339abbe56d9b9c5bf4e90d06383aa912de4dd7d urban wall Outdoors/brick-wall2.jpg
72724d90df71e8340b59d9199b736a839582d4145c94a730b663cf9ad3d6941e urban building Outdoors/building-at-mit.jpg
37b8f49b1f7cb465f64e4669718eec92e7fca7c0e9724c7b228ff59cef432673 urban warehouse Outdoors/building-fireproof.jpg
5486402c0ff5e01236cade4794449ca8243f5b7555af10f9a1aeb247525a91e0 urban castle Outdoors/castle.jpg
4869bfe13acb685053fb610613d6cab659c7efe7cb8af81ac018720bb8cbb6cf urban skyline Outdoors/city-with-water.jpg boston
d5fe279e52c6219354d41fbed7efe91fd5ad173d57c2bb4445869837fc4035b0 urban skyline Outdoors/city-with-water2.jpg boston
d68a17363238af3667767d2675bace26b4c92249eacb15c4a922890f4665ee5b urban mansion Outdoors/driveway.jpg
1755e187137833c431360ad76e94ec5677b984e07925bbca7f5be4b3c41a5c79 urban cloister Outdoors/hallway_outdoors.jpg
2c3559b215100bafcae23b7aeefaaa09b40b013b7facd5b716ca92ef81bc06df landscape hayfield Outdoors/hay_field.jpg
e06f499ea6830d58e954a63dc067abff595156a283f14a720400a1ddf121e870 urban shacks Outdoors/houses.jpg
7b3ef7facbf7c44d97c610d13e314e3b6adf93f8edcaf5b7a6d942190f319797 urban mansion Outdoors/mansion.jpg
2e147b79b03a7565cf082d4ffd91c8cdd6c381b7100c406b643b6b95035366ea urban garage Outdoors/parking-ramp.jpg
66cbb0c5625e886afa3981e5a46c5ac33252e362ed48cdd02e7520877323afcd water pool Outdoors/pool.jpg
9202a27db67f8758e5528dcc7438ce42d53c9f33619fb1634ada6ceda3a01204 urban road Outdoors/route66.jpg
837a55b821784c352cd7dd8f89cfee93565e4978d70b6c8968504ed6e5c84376 urban silos Outdoors/silos.jpg
6d7702796fa6b49a701396f3f8fc7b6d060a987caf9c0b1d5d74f65b60b9e5de urban cinema Outdoors/the-movies.jpg
8780a22be05ddd1baf7aff86adf43d60f063a042daf5da1194183ed2b4cf38a1 landscape railway Outdoors/train-tracks1.jpg
fdfdbf4c24b5c1060befd6bcad408fd6456c8479ee570c2760e9da9b8f906d24 urban railway Outdoors/train-tracks2.jpg
a6b20f4ada48f55837db5db53b006fe41b3a33913bcdf98f4bced666a453c838 urban village Outdoors/village.jpg
b82433d2d54ee0e3cd8b80a109355999f9800f8bef1d78b9531297721ebe9f4b urban cabin Outdoors/wooden-house.jpg
b9160f1137652574446e5f32a5e4b38b1197df5eb3673fc25fd59b32f80b5c08 urban stadium Sports/baseball-field.jpg
299ddacaeb788af35619670004a498f7379e434faea6efa4d97bae5714a05992 urban stadium Sports/football-field.jpg
bee22943bceb3e8b654f4a15e8467cb6ca32f91a6971a8e7a0b055678376eaec landscape field Sports/playing-field.jpg
dee231ff34eccfd7847ccd52dc05a5fc005ad317352a42f6160200dfaa61a49a urban tennis Sports/tennis-backboard.jpg
"""


def parse_manifest(text: str) -> tuple[Photo, ...]:
    """Photos from the table format of ``_MANIFEST_TABLE``; ValueError names every bad line or entry."""
    photos, problems, header = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if line.startswith("["):
            header = line.strip("[] ").split()
        elif fields and len(header) == 3 and len(fields) in (4, 5):
            stem = PurePosixPath(fields[3]).with_suffix("").as_posix().replace("/", "-")
            photos.append(Photo(header[0], header[1], f"{header[2]}/{fields[3]}", *fields[:3],
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


MANIFEST: tuple[Photo, ...] = parse_manifest(_MANIFEST_TABLE)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
