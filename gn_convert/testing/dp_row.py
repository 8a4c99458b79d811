"""The DP-ready differential check of one catalog model, shared by ``scripts/dp_catalog.py`` and its test.

:func:`dp_row` converts a torchvision or ``timm/...`` classification model (untrained weights),
makes a copy DP-ready, and compares the two itself (not through the proof ``make_dp_ready`` runs):
outputs in training and evaluation mode and every parameter's gradient, with the same seed. Then it
runs one DP-SGD step of Opacus's ``PrivacyEngine`` (hooks mode, Opacus's default) on the DP-ready
model. A model ``make_dp_ready`` refuses is a row with the refusal's text.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import torch
from torch import nn

from gn_convert.difference import relative_error
from gn_convert.errors import GnConvertError
from gn_convert.load.names import build_model
from gn_convert.surgery.dp import make_dp_ready
from gn_convert.surgery.equivalence import tensors_of
from gn_convert.surgery.replace import convert
from gn_convert.testing.sweep_row import smallest_size


def _run(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """Output and parameter gradients of a seeded random projection of the output, seeded."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        output = model(x.clone())
    gen = torch.Generator().manual_seed(1)
    terms = [(t * torch.randn(t.shape, generator=gen)).sum() for t in tensors_of(output) if t.requires_grad]
    if terms:
        torch.stack(terms).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return [t.detach() for t in tensors_of(output)], grads


def _dp_step(model: nn.Module, size: int, classes: int) -> float:
    """One DP-SGD step under Opacus's PrivacyEngine (hooks mode); the largest parameter change."""
    from opacus import PrivacyEngine

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, size, size, generator=gen), torch.randint(0, classes, (4,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and full-backward-hook notes
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False)  # every batch holds its two samples
        xb, yb = next(iter(loader))
        optimizer.zero_grad()
        # every output's loss (GoogLeNet trains its auxiliary classifiers too: Opacus wants every parameter's gradient)
        torch.stack([nn.functional.cross_entropy(t, yb) for t in tensors_of(private(xb))]).sum().backward()
        optimizer.step()
    return max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))


def dp_row(name: str, groups: int = 8) -> dict[str, Any]:
    """Convert one model, make a copy DP-ready, compare it with the converted model, take a DP step.

    Args:
        name: a torchvision classification model name or ``timm/<architecture>``.
        groups: the G of the conversion (small, so that every layer converts).

    Returns:
        The row: ``model``, ``input_size``, ``params_m``, ``outputs`` and ``gradients`` (largest
        relative difference in either mode), ``rewrites`` (modules whose forward was rewritten),
        ``dp_step_change`` (largest parameter change of the DP-SGD step), ``seconds``, and
        ``refused`` (the refusal's text) or ``error`` (what else failed).
    """
    start = time.perf_counter()
    torch.manual_seed(0)
    converted = convert(build_model(name, num_classes=10).eval(), groups, on_single="skip").eval()
    size = smallest_size(converted, modes=(True, False))  # Inception's auxiliary head runs in training only
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    row: dict[str, Any] = {"model": name, "input_size": size,
                           "params_m": round(sum(p.numel() for p in converted.parameters()) / 1e6, 2)}
    try:
        ready = make_dp_ready(copy.deepcopy(converted), x)
    except GnConvertError as err:
        return {**row, "refused": str(err), "seconds": round(time.perf_counter() - start, 1)}
    row["rewrites"] = sorted(n for n, m in ready.named_modules() if "forward" in vars(m))
    outputs = gradients = 0.0
    for training in (True, False):
        (want, want_grads), (got, got_grads) = _run(converted, x, training), _run(ready, x, training)
        outputs = max(outputs, relative_error(want, got))
        gradients = max(gradients, relative_error(want_grads, got_grads))
    row.update(outputs=outputs, gradients=gradients)
    try:
        row["dp_step_change"] = _dp_step(ready.train(), size, 10)
    except Exception as err:  # noqa: BLE001 - the row records what Opacus said
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row
