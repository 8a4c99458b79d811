"""Data sources: folders (labelled and plain), datasets, seeded splits, unreadable images,
model transforms and the digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import ResNet18_Weights

from gn_convert.data import UNLABELLED, as_item, load_data, model_transforms, split_batch, split_indices
from gn_convert.data.folders import scan_folder
from gn_convert.errors import DataError
from gn_convert.testing.digits import digits
from gn_convert.testing.synthetic import SyntheticImages


def _image(path: Path, value: int, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size + 4, 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def _labelled_folder(root: Path, per_class: int = 5) -> Path:
    for k, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            _image(root / name / f"{i}.png", 40 * k + i)
    return root


def test_class_subfolders_are_labelled_and_split_by_seed(tmp_path) -> None:
    root = _labelled_folder(tmp_path / "data")
    split = load_data(root, input_size=16, holdout=0.2, seed=1)
    assert split.labelled and split.classes == ["cat", "dog"]
    assert (len(split.train), len(split.heldout)) == (8, 2)
    image, label = split.heldout[0]
    assert image.shape == (3, 16, 16) and label in (0, 1)
    again = load_data(root, input_size=16, holdout=0.2, seed=1)
    assert again.heldout.files == split.heldout.files
    other = load_data(root, input_size=16, holdout=0.2, seed=2)
    assert other.heldout.files != split.heldout.files


def test_plain_folder_is_unlabelled(tmp_path) -> None:
    for i in range(4):
        _image(tmp_path / f"{i}.jpg", 10 * i)
    split = load_data(tmp_path, input_size=8, holdout=1)
    assert not split.labelled and split.classes is None
    assert len(split.train) == 3 and split.train[0][1] == UNLABELLED


def test_unreadable_images_are_skipped_and_counted_never_fatal(tmp_path, caplog) -> None:
    root = _labelled_folder(tmp_path / "data", per_class=3)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    scan = scan_folder(root)
    assert len(scan.files) == 6 and [p.name for p in scan.skipped] == ["broken.png"]
    # a file that breaks after the scan is replaced by the next readable one when loaded
    split = load_data(root, input_size=8, holdout=0, augment=False)
    split.train.files[0].write_bytes(b"garbage")
    image, _ = split.train[0]
    assert image.shape == (3, 8, 8) and len(split.train.skipped) == 1
    assert "skipping unreadable image" in caplog.text


@pytest.mark.parametrize("make", ["missing", "empty", "file", "only-broken"])
def test_bad_folders_raise_one_line_data_errors(tmp_path, make: str) -> None:
    path = tmp_path / "data"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    elif make == "only-broken":
        path.mkdir()
        (path / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError) as err:
        load_data(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_datasets_and_loaders_give_image_label_items_with_a_held_out_part() -> None:
    images, labels = torch.randn(20, 3, 4, 4), torch.arange(20) % 3
    split = load_data(DataLoader(TensorDataset(images, labels), batch_size=5), holdout=5, seed=0)
    assert split.labelled and (len(split.train), len(split.heldout)) == (15, 5)
    image, label = split.heldout[0]
    assert isinstance(label, int) and torch.equal(image, images[split.heldout.indices[0]])
    unlabelled = load_data(TensorDataset(images), holdout=0)
    assert not unlabelled.labelled and unlabelled.heldout is None
    with pytest.raises(DataError, match="empty"):
        load_data(TensorDataset(torch.empty(0, 3)))
    with pytest.raises(DataError, match="cannot use"):
        load_data(42)


def test_split_indices_are_disjoint_complete_and_seeded() -> None:
    train, held = split_indices(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert split_indices(100, 0.1, seed=3) == (train, held)
    with pytest.raises(DataError, match="nothing to train"):
        split_indices(5, 5, seed=0)


def test_split_batch_drops_labels_when_none_are_real() -> None:
    x = torch.zeros(2, 3)
    assert split_batch((x, torch.tensor([-1, -1])))[1] is None
    assert torch.equal(split_batch([x, torch.tensor([0, -1])])[1], torch.tensor([0, -1]))
    assert split_batch(x)[1] is None


def test_model_transforms_follow_the_weights_preset() -> None:
    prep = model_transforms(ResNet18_Weights.DEFAULT)
    assert (prep.crop_size, prep.resize_size) == (224, 256)
    assert prep.mean == (0.485, 0.456, 0.406)
    image = Image.fromarray(np.full((300, 400, 3), 128, dtype=np.uint8))
    assert prep.eval(image).shape == (3, 224, 224) and prep.train(image).shape == (3, 224, 224)
    assert model_transforms(None, input_size=32).resize_size == 37


def test_digits_are_real_standardised_and_split_1400_397() -> None:
    split = digits(size=16, channels=3)
    train_images, train_labels = split.train.tensors
    assert train_images.shape == (1400, 3, 16, 16) and len(split.heldout) == 397
    assert float(train_images.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(train_images.std()) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(train_images[:, 0], train_images[:, 2])
    assert sorted(set(train_labels.tolist())) == list(range(10))


def test_synthetic_images_are_seeded() -> None:
    a, b = SyntheticImages(8, seed=1), SyntheticImages(8, seed=1)
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == 3
    assert not torch.equal(a[3][0], SyntheticImages(8, seed=2)[3][0])
    with pytest.raises(IndexError):
        a[8]



@pytest.mark.parametrize("label", [np.int64(3), np.int32(3), np.uint8(3), 3, torch.tensor(3), torch.tensor([3])],
                         ids=["np.int64", "np.int32", "np.uint8", "int", "tensor", "tensor[1]"])
def test_integer_labels_of_any_kind_are_labels(label) -> None:
    """Defect: numpy integer labels (a dataset built from a numpy array) were read as unlabelled."""
    image, got = as_item((torch.zeros(3, 2, 2), label))
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("label", [np.float64(3.0), 3.5, True, "cat", None, torch.tensor([1, 2])],
                         ids=["np.float64", "float", "bool", "str", "None", "tensor[2]"])
def test_other_labels_are_unlabelled(label) -> None:
    assert as_item((torch.zeros(3, 2, 2), label))[1] == UNLABELLED


def test_a_numpy_labelled_dataset_is_labelled_end_to_end() -> None:
    class NumpyLabels(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.full((3, 4, 4), float(i)), np.arange(10, dtype=np.int64)[i] % 3

    split = load_data(NumpyLabels(), holdout=2, seed=0)
    assert split.labelled and sorted({split.train[i][1] for i in range(len(split.train))}) == [0, 1, 2]
