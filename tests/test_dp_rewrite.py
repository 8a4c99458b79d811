"""make_dp_ready's out-of-place rewrite keeps the function, or refuses by name: the forms that
break a naive rewrite (in-place statements whose result is dropped, chains, aliases, slices)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.dp import check_dp_ready, make_dp_ready
from gn_convert.surgery.equivalence import assert_same_function, probe_input


class Block(nn.Module):
    """conv -> norm, then ``body(out, x)``: the in-place code under test."""

    def __init__(self, body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).step(self.norm(self.conv(x)), x)


def block(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> nn.Module:
    """A Block subclass whose own forward tail is ``forward`` (so inspect.getsource sees it)."""
    cls = type("Tail", (Block,), {"step": staticmethod(forward)})
    torch.manual_seed(0)
    return nn.Sequential(cls(forward), nn.GroupNorm(1, 4), cls(forward)).eval()


def add_statement(out, x):
    out.add_(x)
    F.relu(out, inplace=True)
    return out


def torch_relu_statement(out, x):
    out.mul_(2)
    torch.relu_(out)
    return out + x


def chained(out, x):
    y = out.add_(x).relu_().mul_(0.5)
    return y - out  # y and out are one tensor: 0 in eager


def augmented_alias(out, x):
    kept = out
    out += x
    return kept * 2  # kept is out: it sees the addition


def in_place_after_read(out, x):
    before = out * 1.0
    out.sub_(x)
    return before + out


def in_place_slice(out, x):
    out[:, :2].relu_()
    return out


def view_read_later(out, x):
    flat = out.flatten(1)
    out.add_(1)
    return flat.sum(1)


FORMS = [add_statement, torch_relu_statement, chained, augmented_alias, in_place_after_read]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_rewrite_keeps_outputs_of_in_place_forms(form) -> None:
    model = block(form)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x.clone())
    ready = make_dp_ready(model)
    assert isinstance(ready[0], torch.fx.GraphModule)
    assert not any(n.op in ("call_method", "call_function") and str(n.target).endswith("_")
                   for n in ready[0].graph.nodes)
    with torch.no_grad():
        assert float((ready.eval()(x) - expected).abs().max()) < 1e-6
    check_dp_ready(ready.train(), x)


def test_issue_example_is_rewritten_exactly() -> None:
    """The review's example: the dropped ``add_`` result made outputs differ by 2.58."""
    model = block(add_statement)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = model(x.clone())
        got = make_dp_ready(model).eval()(x)
    assert float((got - expected).abs().max()) == 0.0


@pytest.mark.parametrize("form", [in_place_slice, view_read_later], ids=lambda f: f.__name__)
def test_in_place_on_shared_memory_is_refused_by_name(form) -> None:
    with pytest.raises(UnsupportableLayerError, match=r"cannot make 0 \(Tail\) DP-ready: .* read afterwards"):
        make_dp_ready(block(form))


def test_slice_assignment_is_refused_by_name() -> None:
    class Assign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            out[:, :2] += 1
            return out

    with pytest.raises(UnsupportableLayerError, match=r"cannot make 1 \(Assign\) DP-ready: .*cannot trace"):
        make_dp_ready(nn.Sequential(nn.GroupNorm(1, 3), Assign()))


def test_parent_reading_what_an_in_place_child_modified_is_redirected() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            self.act(out)  # modifies out; the result is dropped
            return out

    model = nn.Sequential(Parent(), nn.GroupNorm(2, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    ready = make_dp_ready(model)
    assert not ready[0].act.inplace
    with torch.no_grad():
        assert float((ready.eval()(x) - expected).abs().max()) == 0.0


def test_a_change_the_rewrite_cannot_see_is_caught_by_the_probe_and_named() -> None:
    class MutatesInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.relu_()  # the caller's tensor changes too
            return self.conv(x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = MutatesInput()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y + x  # eager: x was rectified by inner

    with pytest.raises(UnsupportableLayerError, match=r"make_dp_ready changed what the model computes \(training "
                                                      r"mode, .*first differing module: the model itself"):
        make_dp_ready(Outer(), torch.randn(2, 3, 4, 4))


def test_equivalence_check_names_the_first_differing_module() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed[1].bias += 0.5
    x = probe_input(original)
    assert x.shape == (2, 3, 64, 64)
    assert assert_same_function(original, copy.deepcopy(original), x, "nothing") == 0.0
    with pytest.raises(UnsupportableLayerError, match=r"first differing module: 1\)"):
        assert_same_function(original, changed, x, "a test")


def test_training_mode_is_proved_with_the_same_dropout_masks() -> None:
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.drop = nn.Conv2d(3, 3, 1), nn.Dropout(0.5, inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            self.drop(out)  # in place: out is the dropped-out tensor
            return out

    ready = make_dp_ready(Drop())  # proved in training mode too: masks drawn from the same seed
    zeros = float((ready.train()(torch.ones(2, 3, 8, 8)) == 0).float().mean())
    assert 0.3 < zeros < 0.7 and not ready.drop.inplace


def test_forward_baking_the_training_flag_into_an_in_place_call_is_refused() -> None:
    class Baked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.conv(x), 0.5, self.training, inplace=True)

    with pytest.raises(UnsupportableLayerError, match=r"the model \(Baked\) DP-ready: .*depends on training mode"):
        make_dp_ready(Baked())
