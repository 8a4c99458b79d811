"""Default parity tolerances per execution provider and dtype.

Errors are measured against the PyTorch model in float32. ``max_rel`` bounds the max abs
error divided by the max magnitude of the reference output; ``min_cosine`` bounds the cosine
similarity of each sample's output (the smallest over the batch).

- float32 on CPU: ``max_rel`` 1e-4, the bound the exporter's tests hold on every model.
  Measured: 2e-6 to 5e-6 on resnet18 and mobilenet_v3_small.
- float32 on CUDA and TensorRT: 1e-3 (cuDNN algorithm choice and TF32 convolutions, which
  onnxruntime may enable by default on Ampere and later).
- float16 anywhere: 1e-2 (float16 keeps 11 significant bits; errors accumulate per layer).
  onnxruntime's own tests use atol 2.5e-3 per op; a deep network needs more.
- Hard inputs (large mean, large scale): bounds times :data:`HARD_INPUT_FACTOR`. At mean
  1000 float32 resolves only about 6e-5 of the input, and the convolution before the first
  GroupNorm cancels most of it.
- Every bound is loosened, where a row would fail it, to :data:`REFERENCE_NOISE_FACTOR` times
  the float32 reference's own error against a float64 run of the same model on the same
  inputs (``max_rel`` up, ``min_cosine`` down by twice the reference's cosine deficit): two
  float32 implementations cannot agree more closely than each agrees with the exact result.
  Bounds a user passes (``tolerances=``, ``--max-rel``) are taken literally.
  Measured at mean 1000: torch is 5e-5 (mobilenet_v3_small) to 3.7e-3 (shufflenet_v2_x0_5)
  away from float64. On ordinary inputs the floor is far below the bounds above.
- OpenVINO's CPU runtime (``openvino``: the f32 precision hint) has float32 CPU's bounds; measured
  2e-6 to 5e-6 on resnet18 and mobilenet_v3_small (64 px) in both shape modes, as onnxruntime.
- ``openvino-default`` computes in bfloat16 on CPUs with AVX512-BF16 or AMX (OpenVINO's default
  there; float32 elsewhere). bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3) and a
  network compounds one rounding per layer: measured 2.9e-2 to 9.9e-2 (cosine down to 0.9962) on
  those two models, which no float32 bound admits. Its rows start from float32 CPU's bounds, and
  where the session computes in bfloat16 they are loosened, as for the reference noise below, to
  :data:`REFERENCE_NOISE_FACTOR` times PyTorch's own bfloat16 run of the same model on the same inputs
  (2.5e-2 to 8.4e-2 on those models, cosine down to 0.9972: within a factor 1.4 of OpenVINO's; the
  bound is derived per model and input, not a constant fitted to them). A cosine's deficit
  ``1 - cos`` is about half the squared relative error, so the same factor on the error is its square
  on the deficit: bf16 rows allow ``REFERENCE_NOISE_FACTOR ** 2`` times PyTorch's deficit (ResNet-18
  at 224 px, input mean 1000: OpenVINO 1.37x PyTorch's error, 2.9x its deficit). Its batch-independence bound
  is loosened the same way, to its bound on the random inputs: in bfloat16 OpenVINO's kernels round
  differently at another batch size (a sample of MobileNetV3-Large moved by 2e-2 with its batch in
  the ``openvino`` file, 0 in the ``inlined`` one; float32: 4e-6).
- Batch independence: ``invariance_rel``, a sample alone vs inside a batch. Samples that
  interact (BatchNorm in training semantics) change outputs by O(1); what remains is kernel
  numerics. onnxruntime's CPU kernels are usually bit-identical across batch sizes (0.0
  measured on most models), but not always: regnet_y_32gf and regnet_y_128gf changed by
  1.1e-5 and 3.3e-5 with optimisations off (other GEMM blocking at batch 1). The bound is the
  provider's own ``max_rel``: a sample's output may move with its batch no more than it may
  differ from PyTorch. GPU kernels may pick other algorithms per batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gn_convert.errors import ParityError

HARD_INPUT_FACTOR = 10.0
REFERENCE_NOISE_FACTOR = 2.0


@dataclass(frozen=True)
class Tolerance:
    """Pass bounds for one provider and dtype.

    Attributes:
        max_rel: max abs error / max |reference| allowed.
        min_cosine: smallest per-sample cosine similarity allowed.
        invariance_rel: max relative change of a sample's output between batch 1 and inside a batch.
    """

    max_rel: float
    min_cosine: float
    invariance_rel: float

    def scaled(self, factor: float) -> Tolerance:
        """The same tolerance with ``max_rel`` times ``factor`` (for hard inputs)."""
        return Tolerance(self.max_rel * factor, self.min_cosine, self.invariance_rel)

    def within_noise(self, noise_rel: float, noise_cosine: float,
                     cosine_factor: float = REFERENCE_NOISE_FACTOR) -> Tolerance:
        """This tolerance, loosened where needed to :data:`REFERENCE_NOISE_FACTOR` times the
        reference's own float32 noise (its max relative error and cosine against float64), and the
        cosine's deficit to ``cosine_factor`` times the reference's."""
        if not (math.isfinite(noise_rel) and math.isfinite(noise_cosine)):  # a reference that overflowed
            return self  # says nothing about float32's error: it must not open the bound to infinity
        return Tolerance(max(self.max_rel, REFERENCE_NOISE_FACTOR * noise_rel),
                         min(self.min_cosine, 1 - cosine_factor * (1 - noise_cosine)),
                         self.invariance_rel)


DEFAULT_TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("cpu", "float32"): Tolerance(1e-4, 0.99999, 1e-4),
    ("cpu", "float16"): Tolerance(1e-2, 0.999, 1e-3),
    ("cpu-native", "float32"): Tolerance(1e-4, 0.99999, 1e-4),
    ("cpu-native", "float16"): Tolerance(1e-2, 0.999, 1e-3),
    ("cuda", "float32"): Tolerance(1e-3, 0.9999, 1e-4),
    ("cuda", "float16"): Tolerance(1e-2, 0.999, 1e-3),
    ("tensorrt", "float32"): Tolerance(1e-3, 0.9999, 1e-4),
    ("tensorrt", "float16"): Tolerance(1e-2, 0.999, 1e-3),
    ("openvino", "float32"): Tolerance(1e-4, 0.99999, 1e-4),
    ("openvino", "float16"): Tolerance(1e-2, 0.999, 1e-3),
    ("openvino-default", "float32"): Tolerance(1e-4, 0.99999, 1e-4),
    ("openvino-default", "float16"): Tolerance(1e-2, 0.999, 1e-3),
}


def tolerance_for(provider: str, dtype: str, overrides: dict[tuple[str, str], Tolerance] | None = None) -> Tolerance:
    """The tolerance of a provider and dtype, user overrides first.

    Args:
        provider: ``cpu``, ``cpu-native``, ``cuda``, ``tensorrt``, ``openvino`` or ``openvino-default``.
        dtype: ``float32`` or ``float16``.
        overrides: entries that replace the defaults.

    Returns:
        The tolerance.

    Raises:
        ParityError: no tolerance is known for the pair (an unknown provider or dtype), rather
            than a silently borrowed one.
    """
    table = {**DEFAULT_TOLERANCES, **(overrides or {})}
    found = table.get((provider, dtype))
    if found is None:
        known = sorted({d for _, d in table})
        raise ParityError(f"no parity tolerance for {provider} with {dtype} inputs (known dtypes: "
                          f"{', '.join(known)}); pass tolerances={{({provider!r}, {dtype!r}): Tolerance(...)}} "
                          "or --max-rel")
    return found
