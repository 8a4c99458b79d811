"""DP transfer study: fine-tune a pretrained BatchNorm network with DP-SGD (Opacus) from four starting points.

Opacus refuses BatchNorm, so a pretrained BatchNorm network must lose it before DP-SGD. Side
by side in one run, for each network of ``scripts/dp_transfer_tasks.py`` (a ResNet-18
pretrained on digits 0-4, fine-tuned on digits 5-9; EfficientNet-Lite0 with its ImageNet
weights, fine-tuned to tell 8 photos apart), the same DP fine-tuning starts from:

- (a) ``fix``: Opacus's ``ModuleValidator.fix``: every BatchNorm becomes a fresh
  ``GroupNorm(gcd(32, C), C)`` (weight 1, bias 0): the pretrained statistics and affine are lost;
- (b) ``fold``: each BatchNorm folded into the convolution before it (exact in eval mode,
  checked below 1e-4), no normalisation left;
- (c) ``convert``: ``gn_convert.convert(teacher, 32, dp_ready=True)``, GroupNorm with its
  affine initialised from the BatchNorm statistics (data-free);
- (d) ``recover``: ``gn_convert.recover`` on PUBLIC images only (digits 0-4; crops of other
  photos), then ``make_dp_ready``.

``ModuleValidator.fix``'s output keeps torchvision's in-place ReLU and ``out += identity``, so on
the ResNet its first DP-SGD step fails ("Output 0 of BackwardHookFunction is a view and is being
modified inplace"; the run prints whether it does, per network): without
``gn_convert.surgery.dp.make_dp_ready`` (a) cannot train at all. (a) and (b) therefore get
``make_dp_ready`` after their own transformation; it changes no function, only in-place ops.

Protocol (equal for every starting point): the network splits into a frozen body (eval mode;
its output on the task's images is computed once per starting point, which is exact because
frozen GroupNorm has no batch dependence) and a tail (ResNet: ``layer4``; Lite0: the last
MBConv block and the head convolution) plus a new linear head. DP-SGD (Opacus ``make_private``
with the noise multiplier ``make_private_with_epsilon`` would pick, PRV accountant, computed once
per epsilon; Poisson sampling, delta 1e-5, expected batch 128, clip norm 1, SGD lr 0.5 momentum
0.9, 10 epochs) trains the tail's normalisation layers and the head; the tail's convolutions
stay frozen. This is parameter-efficient DP fine-tuning (few trainable
parameters keep the noise small), and what fits a CPU: per-sample gradients of all of
ResNet-18's ``layer4`` (8.4 M weights) took about 40 s per epoch of 611 digits on one core.
(b) has no normalisation layer, so only its head trains. Row epsilon = inf: the same run with
clipping and no noise. Seeds vary the head's initialisation, the Poisson batches and the noise;
the starting points are built once per network (pretraining seed 0; ``recover`` runs for a time
budget, so (d) depends a little on the machine's speed). The privacy unit is one
training image (one crop for Lite0; crops of one photo are correlated, so this is not
photo-level privacy).

Usage::

    python scripts/dp_transfer.py                    # full study: docs/dp_transfer.{json,png}
    python scripts/dp_transfer.py --fast             # digits, epsilon 3, 2 seeds (the test runs it)
    python scripts/dp_transfer.py --networks digits --seeds 0,1 --epsilons 1,3,8
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_transfer_report import STARTS, pivot, plot, table, write_json  # noqa: E402
from dp_transfer_tasks import Network, digits_network, fold_batchnorm, lite0_network  # noqa: E402

import gn_convert  # noqa: E402
from gn_convert.errors import UnsupportableLayerError  # noqa: E402
from gn_convert.surgery.dp import check_dp_ready, make_dp_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class StudyConfig:
    """What one run of the study does (the defaults are the full study)."""

    networks: tuple[str, ...] = ("digits", "lite0")
    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    reference: bool = True  # also epsilon = inf (clipping, no noise)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.5
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    groups: int = 32
    teacher_epochs: int = 6
    recover_budget: tuple[float, float] = (45.0, 120.0)  # seconds: digits, lite0
    lite0_size: int = 128


FAST = StudyConfig(networks=("digits",), seeds=(0, 1), epsilons=(3.0,), reference=False, epochs=6,
                   teacher_epochs=3, recover_budget=(6.0, 60.0))


@dataclass
class Start:
    """A starting point: the DP-ready model (the teacher's head still on) and how it was made."""

    name: str
    model: nn.Module
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """One DP fine-tuning: its test accuracy (%), noise multiplier, epsilon spent and time."""

    network: str
    start: str
    epsilon: float
    seed: int
    accuracy: float
    noise_multiplier: float
    epsilon_spent: float
    seconds: float


@dataclass
class Study:
    """Everything a run of the study measured."""

    config: StudyConfig
    runs: list[Run]
    networks: dict[str, dict[str, Any]]
    summary: list[dict[str, Any]]
    cpu_seconds: float


def fix_alone(model: nn.Module, example: torch.Tensor) -> str:
    """Whether ``ModuleValidator.fix``'s output survives a DP step's backward as it is (hooks as Opacus's)."""
    try:
        check_dp_ready(copy.deepcopy(model).train(), example)
    except UnsupportableLayerError as err:
        return f"fails: {err}"
    return "trains"


def starting_points(net: Network, cfg: StudyConfig) -> dict[str, Start]:
    """The four DP-ready starting points (a)-(d) of ``net``'s teacher (see the module docstring)."""
    from opacus.validators import ModuleValidator

    example = net.task.train_x[:8]
    starts: dict[str, Start] = {}
    begin = time.perf_counter()
    fixed = ModuleValidator.fix(net.teacher)
    detail = {"fix_alone": fix_alone(fixed, example)}
    starts["fix"] = Start("fix", make_dp_ready(fixed), time.perf_counter() - begin, detail)
    begin = time.perf_counter()
    folded, error = fold_batchnorm(net.teacher, example)
    if error >= 1e-4:
        raise AssertionError(f"{net.name}: the folded model differs from the BatchNorm one by {error:.2e}")
    starts["fold"] = Start("fold", make_dp_ready(folded), time.perf_counter() - begin, {"fold_max_error": error})
    begin = time.perf_counter()
    starts["convert"] = Start("convert", gn_convert.convert(net.teacher, cfg.groups, dp_ready=True),
                              time.perf_counter() - begin)
    budget = cfg.recover_budget[0 if net.name == "digits" else 1]
    begin = time.perf_counter()
    result = gn_convert.recover(net.teacher, net.public, groups=cfg.groups, budget=budget, seed=0, batch_size=16,
                                device="cpu")
    starts["recover"] = Start("recover", make_dp_ready(result.model), time.perf_counter() - begin,
                              {"budget_s": budget, "heldout_agreement": result.agreement,
                               "stages": [(s.name, s.seconds, s.agreement) for s in result.stages]})
    return starts


@torch.no_grad()
def cache(start: Start, net: Network) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The frozen body's outputs on the task's training and test images, and the tail (a copy)."""
    model = copy.deepcopy(start.model)
    body, tail = net.split(model)
    body.eval()
    train = torch.cat([body(chunk) for chunk in net.task.train_x.split(64)])
    test = torch.cat([body(chunk) for chunk in net.task.test_x.split(64)])
    return train, test, tail


def trainable_parameters(tail: nn.Module) -> list[nn.Parameter]:
    """Freeze the tail but for its normalisation layers; their parameters (none for a folded tail)."""
    params = []
    for module in tail.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(isinstance(module, NORMS))
            if param.requires_grad:
                params.append(param)
    return params


@functools.cache
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, epochs: int) -> float:
    """The noise multiplier ``make_private_with_epsilon`` would choose (its own call; cached, 2 s each)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      epochs=epochs, accountant="prv"))


def fine_tune(features: tuple[torch.Tensor, torch.Tensor, nn.Module], net: Network, start: str, epsilon: float,
              seed: int, cfg: StudyConfig) -> Run:
    """DP-SGD on the tail's norm layers and a new head at ``epsilon`` (inf: clipping only); test accuracy."""
    from opacus import PrivacyEngine

    train, test, tail = features
    tail = copy.deepcopy(tail).train()
    torch.manual_seed(seed)  # the head's init, then Opacus's Poisson batches and noise (global generator)
    head = nn.Linear(net.features, net.task.classes)
    model = nn.Sequential(tail, head)
    optimizer = torch.optim.SGD(trainable_parameters(tail) + list(head.parameters()), lr=cfg.lr,
                                momentum=cfg.momentum)
    loader = DataLoader(TensorDataset(train, net.task.train_y), batch_size=cfg.batch_size, shuffle=True)
    engine = PrivacyEngine()
    begin = time.perf_counter()
    sigma = 0.0 if math.isinf(epsilon) else noise_multiplier(epsilon, cfg.delta, 1 / len(loader), cfg.epochs)
    private, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm)
    for _ in range(cfg.epochs):
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(private(images), labels).backward()
            optimizer.step()
    private.eval()
    with torch.no_grad():
        found = torch.cat([private(chunk).argmax(1) for chunk in test.split(256)])
    accuracy = 100.0 * float((found == net.task.test_y).float().mean())
    spent = math.inf if math.isinf(epsilon) else float(engine.get_epsilon(cfg.delta))
    return Run(net.name, start, epsilon, seed, round(accuracy, 2), float(optimizer.noise_multiplier), spent,
               round(time.perf_counter() - begin, 2))


def build_network(name: str, cfg: StudyConfig) -> Network:
    """The pretrained network and its tasks, by name."""
    if name == "digits":
        return digits_network(cfg.teacher_epochs)
    if name == "lite0":
        return lite0_network(cfg.lite0_size)
    raise ValueError(f"unknown network {name!r}; choose digits or lite0")


def run_study(cfg: StudyConfig, log: Any = print) -> Study:
    """Every network x starting point x epsilon x seed; ``log`` gets one line per step."""
    cpu = time.process_time()
    runs: list[Run] = []
    info: dict[str, dict[str, Any]] = {}
    epsilons = tuple(cfg.epsilons) + ((math.inf,) if cfg.reference else ())
    for name in cfg.networks:
        begin = time.perf_counter()
        net = build_network(name, cfg)
        info[name] = {"teacher": net.note, "task": net.task.description, "chance": 100.0 / net.task.classes,
                      "build_s": round(time.perf_counter() - begin, 1), "starts": {}}
        log(f"{name}: {net.note}; task: {net.task.description}")
        for start in starting_points(net, cfg).values():
            info[name]["starts"][start.name] = {"seconds": round(start.seconds, 1), **start.detail}
            log(f"  {STARTS[start.name]}: built in {start.seconds:.1f} s {start.detail or ''}")
            begin = time.perf_counter()
            features = cache(start, net)
            info[name]["starts"][start.name]["cache_s"] = round(time.perf_counter() - begin, 1)
            for epsilon in epsilons:
                for seed in cfg.seeds:
                    runs.append(fine_tune(features, net, start.name, epsilon, seed, cfg))
                    log(f"    eps {epsilon:g} seed {seed}: {runs[-1].accuracy:.1f} % "
                        f"(sigma {runs[-1].noise_multiplier:.2f}, {runs[-1].seconds:.1f} s)")
    return Study(cfg, runs, info, summarize(runs), round(time.process_time() - cpu, 1))


def summarize(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per network, starting point and epsilon: accuracy mean and std over seeds, per seed, seconds."""
    rows = []
    keys = dict.fromkeys((r.network, r.start, r.epsilon) for r in runs)
    for network, start, epsilon in keys:
        group = [r for r in runs if (r.network, r.start, r.epsilon) == (network, start, epsilon)]
        values = [r.accuracy for r in group]
        rows.append({"network": network, "start": start, "epsilon": epsilon, "accuracy_mean": statistics.fmean(values),
                     "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values,
                     "seeds": [r.seed for r in group], "noise_multiplier": group[0].noise_multiplier,
                     "seconds_mean": statistics.fmean(r.seconds for r in group)})
    return rows


def gap(summary: Sequence[dict[str, Any]], network: str, epsilon: float, better: str = "convert",
        worse: str = "fix") -> float:
    """Mean accuracy of ``better`` minus that of ``worse`` (points) on ``network`` at ``epsilon``."""
    mean = {r["start"]: r["accuracy_mean"] for r in summary if (r["network"], r["epsilon"]) == (network, epsilon)}
    return mean[better] - mean[worse]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="digits only, epsilon 3, 2 seeds, fewer epochs")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; fast 0,1)")
    parser.add_argument("--epsilons", help="comma-separated epsilons (default 1,3,8; fast 3)")
    parser.add_argument("--networks", help="digits,lite0 (default both; fast digits)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "dp_transfer.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "dp_transfer.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Study:
    """Run the study; in full mode (not ``--fast``) write the JSON and the plot."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(Secure RNG|Full backward hook|Optimal order).*")
    cfg = FAST if args.fast else StudyConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.epsilons:
        cfg = replace(cfg, epsilons=tuple(float(e) for e in args.epsilons.split(",")))
    if args.networks:
        cfg = replace(cfg, networks=tuple(args.networks.split(",")))
    study = run_study(cfg, log=lambda line: print(line, flush=True))
    print(table(study.summary))
    print()
    print(pivot(study.summary))
    for network in cfg.networks:
        if 3.0 in cfg.epsilons:
            print(f"{network}: (c) - (a) at epsilon 3: {gap(study.summary, network, 3.0):+.1f} points")
    print(f"CPU time: {study.cpu_seconds:.0f} s")
    if not args.fast:
        write_json(study, args.json)
        plot(study, args.png)
    return study


if __name__ == "__main__":
    main()
