// What one kernel call hands its tasks on onnxruntime's thread pool: the tensors and sizes of a
// GroupNorm on the plain layout (PlainJob), on the blocked NCHWc layout (Job) and of squeeze-excite's
// gating there (ScaleJob). Defined once, outside the per-instruction-set kernel code
// (groupnorm_kernels.h), which every variant reads the same way.
#pragma once

#include <cstdint>

namespace gn_plain {

template <typename T>
struct Job {
  const T* x;
  const T* scale;
  const T* bias;
  T* y;
  int64_t groups;
  int64_t channels_per_group;
  int64_t spatial;
  float epsilon;
};

}  // namespace gn_plain

namespace gn_nchwc {

enum Activation { kNone = 0, kRelu = 1, kHardSwish = 2, kQuickGelu = 3 };

struct Job {
  const float* x;
  const float* z;  // residual, same layout as x, or nullptr
  const float* scale;
  const float* bias;
  float* y;
  int64_t channels;  // C (real)
  int64_t padded;    // Cp
  int64_t spatial;   // H * W
  int64_t group_channels;
  int64_t unit;      // channels per task
  int64_t units;     // tasks per sample
  float epsilon;
  int activation;  // an Activation
  float alpha, beta;
  float* scratch;  // 3 * unit floats per task
  double* sums;    // 2 * unit doubles per task
};

// Squeeze-excite's gating on the blocked layout: y[n, c, p] = x[n, c, p] * s[n, c], one task per
// (sample, block). S is [N, Cs, 1, 1], plain (Cs = C) or blocked (Cs = Cp): the same memory order.
struct ScaleJob {
  const float* x;
  const float* s;
  float* y;
  int64_t channels, padded, spatial, gate_channels;
};

}  // namespace gn_nchwc
