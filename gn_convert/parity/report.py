"""The result of a parity check: one row per provider, optimisation level, input set and batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gn_convert.parity.localise import Localisation
from gn_convert.parity.metrics import Metrics
from gn_convert.parity.tolerances import Tolerance


@dataclass
class ParityRow:
    """One comparison: a provider and optimisation level on one input set at one batch size."""

    provider: str
    level: str
    inputs: str
    batch: int
    metrics: Metrics
    tolerance: Tolerance
    output: str = ""
    """The output compared, for models with several (empty for one)."""

    @property
    def passed(self) -> bool:
        """Within ``max_rel`` and ``min_cosine`` (NaN fails)."""
        return self.metrics.max_rel <= self.tolerance.max_rel and self.metrics.cosine >= self.tolerance.min_cosine


@dataclass
class InvarianceResult:
    """The GroupNorm invariant on the ONNX model: each sample alone vs inside a batch."""

    provider: str
    level: str
    batch: int
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """Every sample's output within ``tolerance`` of its output inside the batch."""
        return self.max_rel <= self.tolerance


@dataclass
class ParityReport:
    """Everything a parity check measured; ``passed`` is the verdict.

    Attributes:
        onnx_path: the checked file.
        dtype: the ONNX model's input type (``float32`` or ``float16``).
        input_shape: the per-sample shape checked (C, ...).
        rows: the comparisons.
        invariance: the batch-independence checks.
        skipped: provider -> why it did not run (absent here: not a failure).
        errors: ``provider/level`` -> why a provider that is present failed to start or run (a failure).
        localisation: ``provider/level`` -> per-layer errors, for each failing one.
    """

    onnx_path: str
    dtype: str
    input_shape: tuple[int, ...]
    rows: list[ParityRow] = field(default_factory=list)
    invariance: list[InvarianceResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    localisation: dict[str, Localisation] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """At least one comparison ran, no provider failed to run, and every comparison and invariant check passed."""
        return bool(self.rows) and not self.errors and all(r.passed for r in self.rows) \
            and all(i.passed for i in self.invariance)

    @property
    def worst_max_rel(self) -> float:
        """The largest relative error of any comparison (NaN when none ran)."""
        return max((row.metrics.max_rel for row in self.rows), default=float("nan"))

    def failures(self) -> list[str]:
        """One line per failed comparison or check, naming the first failing layer when found."""
        lines = [f"{r.provider}/{r.level} {r.inputs} batch {r.batch}{' ' + r.output if r.output else ''}: max_rel "
                 f"{r.metrics.max_rel:.2e} "
                 f"(<= {r.tolerance.max_rel:.0e}), cosine {r.metrics.cosine:.6f}" for r in self.rows if not r.passed]
        lines += [f"{i.provider}/{i.level} batch independence: a sample changes by {i.max_rel:.2e} "
                  f"(<= {i.tolerance:.0e}) with its batch" for i in self.invariance if not i.passed]
        lines += [f"{key}: failed to run: {reason}" for key, reason in self.errors.items()]
        lines += [f"{key}: first GroupNorm layer above {loc.tolerance:.0e}: {loc.first_failing}"
                  for key, loc in self.localisation.items() if loc.first_failing]
        return lines

    def table(self) -> str:
        """A plain-text table of every row, the invariance checks and the skipped providers."""
        head = f"{'provider':16} {'opt':7} {'inputs':12} {'batch':>5} {'max_abs':>9} {'max_rel':>9} " \
               f"{'tol':>7} {'cosine':>10} {'top1':>5} {'top5':>5}  result"
        lines = [head]
        for r in self.rows:
            m = r.metrics
            top1 = "-" if m.top1 is None else f"{m.top1:.2f}"
            top5 = "-" if m.top5 is None else f"{m.top5:.2f}"
            inputs = f"{r.inputs}:{r.output}" if r.output else r.inputs
            lines.append(f"{r.provider:16} {r.level:7} {inputs:12} {r.batch:5d} {m.max_abs:9.2e} {m.max_rel:9.2e} "
                         f"{r.tolerance.max_rel:7.0e} {m.cosine:10.7f} {top1:>5} {top5:>5}  "
                         f"{'pass' if r.passed else 'FAIL'}")
        for i in self.invariance:
            lines.append(f"{i.provider:16} {i.level:7} {'batch-indep.':12} {i.batch:5d} {'':9} {i.max_rel:9.2e} "
                         f"{i.tolerance:7.0e} {'':10} {'':>5} {'':>5}  {'pass' if i.passed else 'FAIL'}")
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        lines += self.failures()
        lines.append(f"parity {'PASSED' if self.passed else 'FAILED'} ({self.onnx_path})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``passed`` included)."""
        return {
            "passed": self.passed,
            "onnx_path": self.onnx_path,
            "dtype": self.dtype,
            "input_shape": list(self.input_shape),
            "rows": [{**{k: v for k, v in asdict(r).items() if k not in ("metrics", "tolerance")},
                      **asdict(r.metrics), "tolerance": asdict(r.tolerance), "passed": r.passed} for r in self.rows],
            "invariance": [{**asdict(i), "passed": i.passed} for i in self.invariance],
            "skipped": dict(self.skipped),
            "errors": dict(self.errors),
            "localisation": {k: asdict(v) for k, v in self.localisation.items()},
            "failures": self.failures(),
        }
