"""make_dp_ready keeps the model's function, gradients included, or refuses it by name and leaves it
as it was: copies of hooked outputs where they suffice, the fx rewrite (in-place operations on copies)
only where a module modifies its own hooked input, and a proof on copies that compares outputs,
gradients and buffers in both modes on probes of scale 1 and 20."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.dp import check_dp_ready, is_dp_ready, make_dp_ready
from gn_convert.surgery.equivalence import assert_same_function, probe_input, probe_inputs
from gn_convert.surgery.functionalize import _mutated_argument, _ShallowTracer, functionalize

X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))


def gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each parameter's gradient of ``sum(output * w)`` for a fixed ``w``, in training mode, on ``model`` itself."""
    model.zero_grad(set_to_none=True)
    out = model.train()(x.clone())
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def same_function(before: nn.Module, after: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference of outputs (both modes) and gradients between two models."""
    worst = 0.0
    for training in (True, False):
        with torch.no_grad():
            torch.manual_seed(0)
            a = before.train(training)(x.clone())
            torch.manual_seed(0)
            b = after.train(training)(x.clone())
        worst = max(worst, float((a - b).abs().max()))
    ga, gb = gradients(before, x), gradients(after, x)
    assert ga.keys() == gb.keys()
    return max([worst] + [float((ga[k] - gb[k]).abs().max()) for k in ga])


class Block(nn.Module):
    """conv -> norm, then ``step(out, x)``: in-place code on the norm's output (what ResNet blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).step(self.norm(self.conv(x)), x)


def block(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> nn.Module:
    cls = type("Tail", (Block,), {"step": staticmethod(forward)})
    torch.manual_seed(0)
    return nn.Sequential(cls(), nn.GroupNorm(1, 4), cls())


def add_statement(out, x):
    out.add_(x)
    F.relu(out, inplace=True)
    return out


def chained(out, x):
    y = out.add_(x).relu_().mul(0.5)
    return y - out


def augmented_alias(out, x):
    kept = out
    out += x
    return kept * 2


def in_place_after_read(out, x):
    before = out * 1.0
    out.sub_(x)
    return before + out


def in_place_slice(out, x):
    out[:, :2].relu_()
    return out


@pytest.mark.parametrize("form", [add_statement, chained, augmented_alias, in_place_after_read, in_place_slice],
                         ids=lambda f: f.__name__)
def test_in_place_code_after_a_hooked_output_trains_unchanged_through_copies(form) -> None:
    """Copies of the hooked outputs are enough: no forward is rewritten, and outputs and gradients are
    bit-identical (the old rewrite refused the slice form, and rewrote the rest)."""
    model = block(form)
    reference = copy.deepcopy(model)
    ready = make_dp_ready(model, X)
    assert ready is model and type(ready[0]).__name__ == "Tail" and "forward" not in ready[0].__dict__
    assert same_function(reference, ready, X) == 0.0
    check_dp_ready(ready, X)
    with pytest.raises(UnsupportableLayerError, match=r"is a view and is being modified inplace.* \(in 0\)"):
        check_dp_ready(reference, X)


class NoGradGate(nn.Module):
    """A gate computed without gradient, then an in-place addition: the review's item 6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.gate = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        with torch.no_grad():
            g = torch.sigmoid(self.gate(out))
        out = out * g
        out += x
        return out


def test_a_no_grad_block_keeps_its_gradients() -> None:
    """The fx rewrite dropped the ``no_grad`` block: the conv's gradient changed with no error."""
    torch.manual_seed(0)
    model = nn.Sequential(NoGradGate(), nn.GroupNorm(1, 4))
    reference = copy.deepcopy(model)
    ready = make_dp_ready(model, X)
    assert same_function(reference, ready, X) == 0.0
    assert ready[0].gate.weight.grad is None or float(ready[0].gate.weight.grad.abs().max()) == 0.0


class ReadsWhatItsListedActivationModified(nn.Module):
    """An in-place activation kept in a ModuleList, whose effect the parent reads: the review's item 7."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.acts = nn.Conv2d(4, 4, 1), nn.ModuleList([nn.Hardtanh(-3, 3, inplace=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        self.acts[0](out)  # clamps out; the result is dropped
        return out + 1


def test_an_in_place_activation_in_a_module_list_keeps_its_effect_at_scale_20() -> None:
    """The old code switched the flag off without seeing the call: outputs differed by 2.68 at scale 20."""
    torch.manual_seed(0)
    model = nn.Sequential(ReadsWhatItsListedActivationModified(), nn.GroupNorm(1, 4))
    reference = copy.deepcopy(model)
    make_dp_ready(model, X)
    assert model[0].acts[0].inplace
    assert same_function(reference, model, X * 20) == 0.0
    check_dp_ready(model, X * 20)


class ScaleInPlace(nn.Module):
    """A module with its own parameter that scales its (hooked) input in place: the rewrite's case."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(channels, 1, 1))
        self.acts = nn.ModuleList([nn.Hardtanh(-3, 3, inplace=True)])
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        self.seen.mul_(0.9).add_(0.1 * x.detach().mean((0, 2, 3)))
        x.mul_(self.weight)
        self.acts[0](x)
        return x


def scaled_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), ScaleInPlace(), nn.Conv2d(4, 4, 1))


def test_a_module_modifying_its_hooked_input_is_rewritten_onto_copies_and_keeps_everything() -> None:
    model = scaled_model()
    hook_calls: list[int] = []
    handle = model[2].register_forward_hook(lambda *_: hook_calls.append(1))
    keys, reference = list(model.state_dict()), copy.deepcopy(model)
    ready = make_dp_ready(model, X)
    assert ready is model and type(ready[2]) is ScaleInPlace and ready[2].acts[0].inplace  # flags untouched
    assert list(ready.state_dict()) == keys
    assert int(ready[2].calls) == 0 and torch.equal(ready[2].seen, torch.ones(4))  # the proof ran on copies
    assert not [k for k in vars(ready[2]) if k.startswith("_tensor_constant")]
    hook_calls.clear()
    assert same_function(reference, ready, X * 20) == 0.0  # Hardtanh clamps at scale 20
    assert hook_calls and int(ready[2].calls) == int(reference[2].calls)  # hooks fire; buffers still update
    assert torch.equal(ready[2].seen, reference[2].seen)
    check_dp_ready(ready, X)
    handle.remove()  # a local function does not pickle
    again = pickle.loads(pickle.dumps(ready))
    assert same_function(reference, again, X) == 0.0 and is_dp_ready(again)
    check_dp_ready(copy.deepcopy(ready), X)


class NoGradScale(ScaleInPlace):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = self.weight * 2
        x.mul_(scale)
        return x


def test_a_rewrite_that_would_drop_a_no_grad_block_is_refused_by_its_gradient_and_leaves_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), NoGradScale())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportableLayerError, match=r"its gradient of 2\.weight differs .*left as it was"):
        make_dp_ready(model, X)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "_call_impl" not in vars(model[0]) and "forward" not in vars(model[2])


class Untraceable(nn.Module):
    """In-place code in a helper, and data-dependent control flow fx cannot trace: the review's item 11."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 1, 1))

    def _double(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > -1e9:
            x = self._double(x)
        return x * self.weight


def test_an_untraceable_forward_with_in_place_code_in_a_helper_is_refused_by_name() -> None:
    import gn_convert

    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), Untraceable())
    with pytest.raises(UnsupportableLayerError, match=r"in 2\).*2 \(Untraceable\).*cannot trace"):
        gn_convert.convert(model, 2, dp_ready=True, example_input=X)


class Counter(ScaleInPlace):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # an augmented assignment of a buffer: in place, kept in the rewrite
        x.mul_(self.weight)
        return x


def test_an_augmented_buffer_update_survives_the_rewrite() -> None:
    """The old tracer ran ``self.calls += 1`` on the real buffer during its two traces and left it out
    of the graph: the rewritten model never counted again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), Counter())
    reference = copy.deepcopy(model)
    make_dp_ready(model, X)
    assert int(model[2].calls) == 0 and "forward" in vars(model[2])
    for m in (model, reference):
        m(X.clone())
        m(X.clone())
    assert int(model[2].calls) == int(reference[2].calls) == 2


def test_the_proof_never_runs_the_callers_model() -> None:
    """An InstanceNorm tracking running statistics: the old proof ran the caller's model in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                          nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)).eval()
    before = copy.deepcopy(model.state_dict())
    make_dp_ready(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_refusal_leaves_flags_types_and_function_as_they_were() -> None:
    class Slice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x[:, :2].relu_()  # in place on a slice of the hooked input
            return x * self.weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True), Slice())
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model(x.clone())
    with pytest.raises(UnsupportableLayerError, match=r"2 \(Slice\) DP-ready: .*(read afterwards|cannot trace)"):
        make_dp_ready(model, x)
    assert model[1].inplace and type(model[2]) is Slice
    assert not any("_call_impl" in vars(m) or "forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x.clone()), expected)


def test_the_proof_sees_nan_and_non_tensor_outputs() -> None:
    class Out(nn.Module):
        def __init__(self, nan: bool, count: int) -> None:
            super().__init__()
            self.conv, self.nan, self.count = nn.Conv2d(3, 3, 1), nan, count

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            y = self.conv(x)
            return {"y": y.masked_fill(y > 1, float("nan")) if self.nan else y, "count": self.count}

    torch.manual_seed(0)
    base = Out(False, 3)
    x = probe_input(base)
    for changed in (Out(True, 3), Out(False, 4)):
        changed.load_state_dict(base.state_dict())
        with pytest.raises(UnsupportableLayerError, match="output y|output count"):
            assert_same_function(base, changed, x, "a test")
    with_nan = Out(True, 3)
    assert assert_same_function(with_nan, copy.deepcopy(with_nan), x, "nothing") == 0.0  # NaN where NaN: equal


def test_equivalence_check_names_the_first_differing_module() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed[1].bias += 0.5
    probes = probe_inputs(original)
    assert [tuple(p.shape) for p in probes] == [(2, 3, 64, 64)] * 3
    assert assert_same_function(original, copy.deepcopy(original), probes, "nothing") == 0.0
    with pytest.raises(UnsupportableLayerError, match=r"output differs .*first differing module: 1\)"):
        assert_same_function(original, changed, probes, "a test")


def test_training_mode_is_proved_with_the_same_dropout_masks() -> None:
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.drop = nn.Conv2d(3, 3, 1), nn.Dropout(0.5, inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            self.drop(out)
            return out

    ready = make_dp_ready(Drop())
    zeros = float((ready.train()(torch.ones(2, 3, 8, 8)) == 0).float().mean())
    assert 0.3 < zeros < 0.7 and ready.drop.inplace


def _in_place_nodes(forward: Callable[..., torch.Tensor]) -> list[str]:
    module = type("M", (nn.Module,), {"forward": forward})()
    graph = _ShallowTracer().trace(module)
    return [getattr(n.target, "__name__", n.target) for n in graph.nodes if _mutated_argument(n, frozenset()) is not None]


def test_in_place_detection_knows_data_writes_and_not_flag_setters() -> None:
    assert _in_place_nodes(lambda self, x: x.zero_() + x.fill_(1) + x.copy_(x * 2)) == ["zero_", "fill_", "copy_"]
    assert _in_place_nodes(lambda self, x: F.relu(x, True) + F.hardtanh(x, -1, 1, True)) == ["relu", "hardtanh"]
    assert _in_place_nodes(lambda self, x: x.detach().requires_grad_() * 2) == []


def test_functionalize_puts_the_copy_before_the_in_place_operation_and_redirects_reads() -> None:
    def forward(self, x):
        x.add_(1)
        return x * 2

    module = type("M", (nn.Module,), {"forward": forward})()
    graph = _ShallowTracer().trace(module)
    assert functionalize(graph, {}, frozenset(), "m") == 1
    gm = fx.GraphModule(module, graph)
    x = torch.ones(3)
    assert torch.equal(gm(x), torch.full((3,), 4.0)) and torch.equal(x, torch.ones(3))


def test_a_probe_the_model_cannot_take_is_named_as_such() -> None:
    """Inception's auxiliary head needs a larger input in training mode; the refusal says so instead of
    blaming Opacus's hooks."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 9))
    with pytest.raises(UnsupportableLayerError, match=r"fails on the probe input in training mode .*\(in 2\)\); pass an "
                                                      "example input"):
        make_dp_ready(model, torch.randn(2, 3, 8, 8))
