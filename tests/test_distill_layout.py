"""How a distillation step runs on the CPU (``gn_convert.fidelity.distill.layout``): channels-last
changes strides only and puts every tensor back, the GroupNorm-output loss is the same number and
gradient in either layout, and bfloat16 autocast is on only where asked and native."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gn_convert import convert, distill
from gn_convert.fidelity.distill.layout import autocast_dtype, channels_last, cpu_bf16_supported, images_layout
from gn_convert.fidelity.distill.losses import FeatureTaps
from gn_convert.testing.synthetic import SyntheticImages

TINY = dict(batch_size=8, eval_every=2, holdout=8, lr=1e-2, seed=3, warmup_steps=1, weight_decay=0.1,
            feature_weight=1.0)


def _layouts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: t.stride() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def test_channels_last_changes_strides_only_and_restores_each_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    model[2].weight.data = model[2].weight.data.contiguous(memory_format=torch.channels_last)  # already so
    model[0].weight.data = model[0].weight.data.transpose(2, 3).contiguous().transpose(2, 3)  # neither layout
    before, values = _layouts(model), {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)
    with channels_last(model):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert images_layout(x, True).is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(images_layout(x, True)), reference, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            model[0].weight.add_(1.0)  # a training step inside the block
    assert _layouts(model) == before
    assert torch.equal(model[0].weight, values["0.weight"] + 1.0)
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items() if k != "0.weight")
    with channels_last(model, enabled=False):
        assert _layouts(model) == before


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_feature_loss_is_the_same_number_and_gradient_in_either_layout(layout: torch.memory_format) -> None:
    torch.manual_seed(1)
    s = torch.randn(4, 8, 5, 7, requires_grad=True)
    t = torch.randn(4, 8, 5, 7) * 3 + 1
    taps = FeatureTaps([])
    taps.student["a"], taps.teacher["a"] = s.contiguous(memory_format=layout), t.contiguous(memory_format=layout)
    taps.student["b"], taps.teacher["b"] = s[:, :3, 0, 0], t[:, :3, 0, 0]  # a 2-D output too
    loss = taps.loss()
    loss.backward()
    grad, s.grad = s.grad.clone(), None

    def term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1), b.flatten(1)
        return ((a - b).pow(2).mean(1) / (b.var(1) + 1e-6)).mean()

    reference = (term(s, t) + term(s[:, :3, 0, 0], t[:, :3, 0, 0])) / 2
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-6 * reference.item()
    assert float((grad - s.grad).abs().max()) < 1e-6 * float(s.grad.abs().max())


def test_distillation_in_channels_last_follows_the_default_layout_and_leaves_the_models_as_they_were(
        tiny_teacher: nn.Module) -> None:
    data = SyntheticImages(count=40, shape=(3, 12, 12), num_classes=5, seed=7)
    teacher_layout = _layouts(tiny_teacher)
    runs = {}
    for layout in (False, True):
        student = convert(tiny_teacher, 32)
        student_layout = _layouts(student)
        runs[layout] = distill(student, tiny_teacher, data, steps=4, channels_last=layout, **TINY)
        assert _layouts(student) == student_layout and _layouts(tiny_teacher) == teacher_layout
    images = torch.stack([data[i][0] for i in range(len(data))])
    plain, last = (runs[k].model(images).detach() for k in (False, True))
    moved = float((plain - convert(tiny_teacher, 32).eval()(images).detach()).abs().max())
    differ = float((plain - last).abs().max())
    # measured: moved 0.16, differ 1.5e-6. Parameters are not compared: Adam's first steps move a parameter whose
    # gradient is about zero by about the learning rate whatever the sign of that noise (0.009 apart here)
    assert moved > 0.05  # the four steps trained
    assert differ < 1e-4 * moved, (differ, moved)  # the same function, up to float32 summation order
    assert [p.agreement for p in runs[False].history] == [p.agreement for p in runs[True].history]


def test_bfloat16_autocast_only_where_asked_and_native(tiny_teacher: nn.Module) -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, amp=True, cpu_bf16=False) is None  # amp alone is CUDA's
    assert autocast_dtype(cpu, amp=False, cpu_bf16=True) == (torch.bfloat16 if cpu_bf16_supported() else None)
    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bfloat16 (AVX-512-BF16 or AMX): autocast stays off")
    seen: list[torch.dtype] = []
    student = convert(tiny_teacher, 32)
    conv = next(m for m in student.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype) if out.requires_grad else None)
    data = SyntheticImages(count=40, shape=(3, 12, 12), num_classes=5, seed=7)
    result = distill(student, tiny_teacher, data, steps=3, cpu_bf16=True, **TINY)
    assert seen == [torch.bfloat16] * 3  # the three training forwards (evaluation runs without gradients)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # the weights stay float32
