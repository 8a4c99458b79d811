"""Calibration on data: the fits' numbers, bounded-memory accumulation, and the order
identity < bn-stats <= calibrated on the digits teacher."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from digits_models import agreement, digits_teacher, tiny_teacher
from gn_convert import calibrate, convert
from gn_convert.calibrate import ModelMismatchError, Moments, norm_pairs
from gn_convert.errors import GnConvertError
from gn_convert.models import build_model


def _pair(n: int = 4000, noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 2, 1, 1, generator=gen) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) + 0.5
    y = u * torch.tensor([2.0, -0.5]).view(1, 2, 1, 1) + torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    return u, y + noise * torch.randn(y.shape, generator=gen)


@pytest.mark.parametrize("method", ["variance", "least-squares"])
def test_an_exact_affine_is_recovered_with_r2_one(method: str) -> None:
    u, y = _pair()
    moments = Moments(2, torch.device("cpu"))
    moments.update(u, y)
    slope, intercept, r2 = moments.fit(method)
    assert torch.allclose(slope, torch.tensor([2.0, -0.5], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(intercept, torch.tensor([1.0, 4.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(r2, torch.ones(2, dtype=torch.float64), atol=1e-9)


def test_variance_fit_keeps_the_spread_where_least_squares_shrinks_it() -> None:
    u, y = _pair(noise=2.0)
    moments = Moments(2, torch.device("cpu"))
    moments.update(u, y)
    variance_slope = moments.fit("variance")[0]
    ls_slope = moments.fit("least-squares")[0]
    yc = y.double().squeeze()
    assert torch.allclose(variance_slope.abs(), yc.std(0) / u.double().squeeze().std(0), rtol=1e-3)
    assert float(ls_slope[0]) == pytest.approx(2.0, abs=0.1)  # cov/var(u): unbiased here
    assert abs(float(variance_slope[0])) > abs(float(ls_slope[0])) + 0.2  # inflated by the noise


def test_statistics_accumulated_over_batches_equal_one_pass() -> None:
    u, y = _pair(n=1000, noise=0.3)
    whole, parts = Moments(2, torch.device("cpu")), Moments(2, torch.device("cpu"))
    whole.update(u, y)
    for a, b in zip(u.split(64), y.split(64)):
        parts.update(a, b)
    for x, z in zip(whole.fit("variance"), parts.fit("variance")):
        assert torch.allclose(x, z, atol=1e-10)
    assert parts.count == whole.count == 1000


def test_digits_agreement_orders_identity_below_bn_stats_below_calibrated() -> None:
    teacher = digits_teacher()
    images = teacher.data.heldout.tensors[0]
    identity = agreement(convert(teacher.model, 32, init="identity"), teacher.model, images)
    bn_stats = agreement(convert(teacher.model, 32), teacher.model, images)
    student = convert(teacher.model, 32)
    report = calibrate(student, teacher.model, teacher.data.train, batches=16, order="greedy")
    calibrated = agreement(student, teacher.model, images)
    assert bn_stats >= 0.85
    assert identity < bn_stats - 0.2  # identity: 9-40% here, depending on the teacher's training threads
    assert identity < bn_stats <= calibrated
    assert report.samples == 512 and len(report.layers) == 20
    assert {fit.choice for fit in report.layers} <= {"init", "variance", "least-squares"}
    assert sum(fit.choice != "init" for fit in report.layers) >= 5  # the data did change layers
    assert 0.5 < report.mean_r2 <= 1.0


def test_calibration_accepts_a_dataloader_and_reports_each_layer() -> None:
    teacher = tiny_teacher()
    images = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    student = convert(teacher, 32, init="identity")
    before = agreement(student, teacher, images)
    report = calibrate(student, teacher, DataLoader(TensorDataset(images), batch_size=8), batches=4)
    assert report.batches == 4 and report.samples == 32
    assert [fit.name for fit in report.layers] == ["1", "4", "7"]
    assert all(0.0 <= fit.worst_r2 <= fit.r2 <= 1.0 + 1e-9 for fit in report.layers)
    assert agreement(student, teacher, images) > before


def test_a_student_of_another_architecture_is_refused() -> None:
    student = convert(build_model("resnet18", num_classes=10, init_weights=False), 32)
    with pytest.raises(ModelMismatchError, match="teacher"):
        norm_pairs(student, build_model("resnet34", num_classes=10, init_weights=False))
    with pytest.raises(ModelMismatchError, match="fc.weight"):
        norm_pairs(student, build_model("resnet18", num_classes=5, init_weights=False))
    with pytest.raises(ModelMismatchError, match="no GroupNorm"):
        norm_pairs(tiny_teacher(), tiny_teacher())


def test_unknown_method_order_or_batches_are_refused() -> None:
    student = convert(tiny_teacher(), 32)
    data = TensorDataset(torch.randn(8, 3, 12, 12))
    cases = (({"method": "median"}, "method"), ({"order": "reverse"}, "order"), ({"batches": 0}, "batches"))
    for kwargs, text in cases:
        with pytest.raises(GnConvertError, match=text):
            calibrate(student, tiny_teacher(), data, **kwargs)
