"""The group plan: policies, fallbacks, refusals and patterns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gn_convert
from gn_convert.errors import GroupPlanError, NoBatchNormError, UnsupportableLayerError
from gn_convert.surgery.plan import choose_groups


@pytest.mark.parametrize(
    ("channels", "groups", "policy", "expected"),
    [
        (64, 32, "divisor", 32),
        (24, 32, "divisor", 24),
        (72, 32, "divisor", 24),
        (72, 32, "gcd", 8),
        (40, 32, "divisor", 20),
        (40, 32, "gcd", 8),
        (1152, 32, "divisor", 32),
        (7, 32, "divisor", 7),
        (7, 4, "divisor", 1),
    ],
)
def test_choose_groups_policies(channels: int, groups: int, policy: str, expected: int) -> None:
    num_groups, reason = choose_groups(channels, groups, policy=policy)
    assert num_groups == expected
    assert channels % num_groups == 0
    assert bool(reason) == (channels % groups != 0)


@pytest.mark.parametrize(("channels", "size", "policy", "expected"),
                         [(64, 16, "divisor", 4), (72, 16, "divisor", 4), (72, 16, "gcd", 9), (40, 16, "divisor", 2)])
def test_choose_groups_by_group_size(channels: int, size: int, policy: str, expected: int) -> None:
    assert choose_groups(channels, None, group_size=size, policy=policy)[0] == expected


@pytest.mark.parametrize("kwargs", [dict(groups=0), dict(groups=-3), dict(groups=None, group_size=0),
                                    dict(groups=32, policy="largest")])
def test_choose_groups_rejects_impossible_requests(kwargs: dict) -> None:
    with pytest.raises(GroupPlanError):
        choose_groups(64, **kwargs)


def test_strict_policy_names_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.BatchNorm2d(24))
    with pytest.raises(GroupPlanError, match=r"layer 1: 32 groups do not divide 24"):
        gn_convert.plan(model, 32, policy="strict")


def test_mobilenet_plan_records_every_fallback() -> None:
    model = gn_convert.load_model("mobilenet_v2", "none")
    plan = gn_convert.plan(model, 32)
    assert len(plan.layers) == 52
    assert len(plan.fallbacks) == 7
    assert {(layer.num_channels, layer.num_groups) for layer in plan.fallbacks} == {(16, 16), (24, 24), (144, 24)}
    for layer in plan.converted:
        assert layer.num_channels % layer.num_groups == 0
        assert layer.fallback == (layer.num_groups != 32) == bool(layer.reason)


def test_batchnorm1d_on_vectors_is_refused_or_skipped() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    with pytest.raises(UnsupportableLayerError, match="single value"):
        gn_convert.plan(model, 16)
    plan = gn_convert.plan(model, 16, on_single="skip")
    assert [layer.action for layer in plan.layers] == ["skip"]
    assert gn_convert.plan(model, 4).layers[0].elements_per_group == 4


def test_batchnorm1d_on_sequences_counts_positions() -> None:
    model = nn.Sequential(nn.Conv1d(2, 16, 3), nn.BatchNorm1d(16))
    plan = gn_convert.plan(model, 16, example_input=torch.zeros(1, 2, 10))
    assert plan.layers[0].action == "convert"
    assert plan.layers[0].elements_per_group == 8


def test_include_and_exclude_patterns() -> None:
    model = gn_convert.load_model("resnet18", "none")
    plan = gn_convert.plan(model, 32, exclude=["layer4.*"], include=["layer*"])
    actions = {layer.name: layer.action for layer in plan.layers}
    assert actions["bn1"] == "exclude"
    assert actions["layer4.0.bn1"] == "exclude"
    assert actions["layer1.0.bn1"] == "convert"
    assert len(plan.converted) == 14
    converted = gn_convert.convert(model, plan=plan)
    assert isinstance(converted.layer4[0].bn1, nn.BatchNorm2d)
    assert isinstance(converted.layer1[0].bn1, nn.GroupNorm)


def test_model_without_batchnorm_is_an_error_unless_allowed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(NoBatchNormError) as info:
        gn_convert.plan(model)
    assert str(info.value) == ("the model has no BatchNorm layer to convert; to accept that as a no-op, pass "
                               "--allow-no-bn (allow_no_bn=True from Python)")
    assert gn_convert.convert(model, allow_no_bn=True)[0].weight.equal(model[0].weight)


def test_plan_round_trips_through_dict() -> None:
    plan = gn_convert.plan(gn_convert.load_model("mobilenet_v3_small", "none"), 16, policy="gcd")
    again = gn_convert.GroupPlan.from_dict(plan.to_dict())
    assert again == plan
    assert (len(plan.layers), len(plan.converted), len(plan.fallbacks), len(plan.untouched)) == (34, 34, 11, 0)
    assert plan.summary() == ("34 BatchNorm layers -> GroupNorm (G=16, policy gcd): 23 with 16 groups, 11 with 8; "
                              "11 fallbacks (gcd); 0 left as BatchNorm")
    assert again.min_channels_per_group == plan.min_channels_per_group == 1
    assert again.summary() == plan.summary()


def test_summary_counts_excluded_layers_as_left_as_batchnorm() -> None:
    plan = gn_convert.plan(gn_convert.load_model("resnet18", "none"), 32, exclude=["layer4.*", "bn1"])
    assert plan.summary() == ("14 BatchNorm layers -> GroupNorm (G=32, policy divisor): 14 with 32 groups; 0 fallbacks "
                              "(divisor); 6 left as BatchNorm")


def _mixed_mode_model() -> nn.Module:
    """A model in training mode whose second BatchNorm is frozen in eval mode (a common fine-tuning setup)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    model.train()
    model[4].eval()
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_plan_with_an_example_input_restores_each_modules_own_mode() -> None:
    """Defect: plan() ran the example in eval mode, then put the whole model back in train
    mode, unfreezing a BatchNorm that was in eval mode."""
    model = _mixed_mode_model()
    before = _modes(model)
    stats = [model[4].running_mean.clone(), model[4].running_var.clone()]
    gn_convert.plan(model, 4, example_input=torch.randn(2, 3, 10, 10))
    assert _modes(model) == before and not model[4].training and model[1].training
    assert torch.equal(model[4].running_mean, stats[0]) and torch.equal(model[4].running_var, stats[1])


def test_convert_copies_each_layers_mode() -> None:
    model = _mixed_mode_model()
    converted = gn_convert.convert(model, 4)
    assert isinstance(converted[4], nn.GroupNorm)
    assert _modes(converted) == _modes(model) and converted[1].training and not converted[4].training


def test_testing_helpers_restore_each_modules_own_mode() -> None:
    from gn_convert.testing.bn_stats import estimate_batchnorm_stats
    from gn_convert.testing.digits import predictions

    model = _mixed_mode_model()
    before = _modes(model)
    estimate_batchnorm_stats(model, [torch.randn(4, 3, 10, 10)])
    assert _modes(model) == before
    head = nn.Sequential(model, nn.Flatten(), nn.LazyLinear(3))
    head(torch.randn(1, 3, 10, 10))
    head.train()
    head[0][4].eval()
    before = _modes(head)
    predictions(head, torch.randn(5, 3, 10, 10))
    assert _modes(head) == before


@pytest.mark.parametrize("policy", ["divisor", "gcd"])
def test_min_channels_per_group_bounds_every_policy_and_is_recorded(policy: str) -> None:
    import torchvision

    model = torchvision.models.mobilenet_v3_small()
    plain = gn_convert.plan(model, 8, policy=policy)
    bounded = gn_convert.plan(model, 8, policy=policy, min_channels_per_group=4)
    for before, after in zip(plain.converted, bounded.converted):
        assert after.num_channels // after.num_groups >= min(4, after.num_channels)
        if before.num_channels // before.num_groups >= 4:
            assert after.num_groups == before.num_groups
        else:
            assert after.num_groups < before.num_groups and after.bounded and after.fallback == before.fallback
            assert "the bound of at least 4 channels per group gives" in after.reason
    assert any(layer.num_channels == 16 and layer.num_groups == 4 for layer in bounded.converted)  # 16 ch: 4 groups
    tiny = gn_convert.plan(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)), 32,
                           min_channels_per_group=8)
    assert tiny.converted[0].num_groups == 1  # narrower than the bound: one group
    with pytest.raises(GroupPlanError, match="min_channels_per_group must be >= 1"):
        gn_convert.plan(model, 8, min_channels_per_group=0)


@pytest.mark.product_defaults
def test_default_plan_keeps_sixteen_channels_per_group_unless_told() -> None:
    import torchvision

    from gn_convert.surgery.group_count import DEFAULT_MIN_CHANNELS

    assert DEFAULT_MIN_CHANNELS == 16
    model = torchvision.models.resnet18()
    by_width = {layer.num_channels: layer for layer in gn_convert.plan(model, 32).converted}
    assert {c: layer.num_groups for c, layer in by_width.items()} == {64: 4, 128: 8, 256: 16, 512: 32}
    assert by_width[64].bounded and not by_width[64].fallback  # a chosen default, not a request that failed
    assert by_width[64].reason == "32 groups would hold 2 channels each; the bound of at least 16 channels per group " \
                                  "gives 4"
    assert not by_width[512].bounded and not by_width[512].reason
    forced = gn_convert.plan(model, 32, min_channels_per_group=1)
    assert {layer.num_groups for layer in forced.converted} == {32}  # G=32 on every layer, as asked
    by_size = gn_convert.plan(model, group_size=4)  # a group-size request is its own bound
    assert {layer.num_channels // layer.num_groups for layer in by_size.converted} == {4}
    narrow = gn_convert.plan(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)), 32)
    assert narrow.converted[0].num_groups == 1


@pytest.mark.product_defaults
def test_cli_plan_arguments_leave_the_bound_to_the_library() -> None:
    import argparse

    from gn_convert.cli.arguments import add_plan_arguments, plan_kwargs

    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    assert plan_kwargs(parser.parse_args([]), parser)["min_channels_per_group"] is None
    assert plan_kwargs(parser.parse_args(["--min-channels-per-group", "1"]), parser)["min_channels_per_group"] == 1


@pytest.mark.product_defaults
def test_the_default_summary_says_the_group_counts_and_the_bound_in_words() -> None:
    """ResNet-50 at G=32 gives 31 of 53 layers 4, 8 or 16 groups; the summary read '31 fallbacks'."""
    plan = gn_convert.plan(gn_convert.load_model("resnet50", "none"), 32)
    assert plan.summary() == (
        "53 BatchNorm layers -> GroupNorm (G=32, policy divisor): 22 with 32 groups, 16 with 16, 8 with 8, 7 with 4; "
        "31 keep at least 16 channels per group (--min-channels-per-group 1 for G=32 on every layer); "
        "0 fallbacks (divisor); 0 left as BatchNorm")
    assert plan.to_dict()["min_channels_per_group"] == 16 and not plan.fallbacks and len(plan.bounded) == 31


@pytest.mark.product_defaults
def test_with_gcd_the_reason_says_which_rule_won_in_good_english() -> None:
    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.BatchNorm2d(24))
    layer = gn_convert.plan(model, 16, policy="gcd").converted[0]
    assert layer.num_groups == 1 and layer.fallback and layer.bounded
    assert layer.reason == ("16 does not divide 24; using 8 (gcd); then 8 groups would hold 3 channels each; the bound "
                            "of at least 16 channels per group gives 1")
    one = gn_convert.plan(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)), 16).converted[0]
    assert one.reason.startswith("16 groups would hold 1 channel each;")


def test_a_group_size_larger_than_a_layer_gives_it_one_group() -> None:
    """``--group-size 1000`` ended in 'internal error: StopIteration'."""
    plan = gn_convert.plan(gn_convert.load_model("resnet18", "none"), group_size=1000)
    assert {layer.num_groups for layer in plan.converted} == {1}
    assert plan.converted[0].reason == "group size 1000 does not divide 64; using 64"
    with pytest.raises(GroupPlanError, match="group size 1000 does not divide 64"):
        gn_convert.plan(gn_convert.load_model("resnet18", "none"), group_size=1000, policy="strict")


@pytest.mark.parametrize("option", ["include", "exclude", "fold"])
def test_a_pattern_that_matches_no_layer_is_refused_naming_it(option: str) -> None:
    model = gn_convert.load_model("resnet18", "none")
    with pytest.raises(GroupPlanError, match=rf"{option} pattern 'layr4\.\*' matches no BatchNorm layer \(a typo\?\); "
                                             r"this model's BatchNorm layers are bn1, layer1\.0\.bn1, \.\.\., layer4"):
        gn_convert.plan(model, 32, **{option: ["layr4.*"]})
