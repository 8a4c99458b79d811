// ai.gn_convert::GroupNormNchwc: GroupNorm on onnxruntime's blocked NCHWc layout, optionally
// followed by a residual add and an activation (Relu, HardSwish, QuickGelu/SiLU), for graphs that
// gn_convert/native/nchwc.py rewrote from onnxruntime's own optimised graph (its NchwcTransformer
// output).
//
// Why: onnxruntime runs convolutions on a blocked layout ([N][C/B][H][W][B], B = 8 on AVX2,
// 16 on AVX-512) and reorders the activation out of it and back around every op it has no
// blocked kernel for -- the GroupNorm, the Add and activation after it, and squeeze-excite's
// gating. Reading the blocked tensor here removes the reorders and fuses the Add and activation
// that no longer fuse into the convolution. ScaleNchwc below is squeeze-excite's gating.
//
// The tensor has shape [N, Cp, H, W] with Cp = C rounded up to B (the padding channels are
// zero and stay zero). One task per (sample, unit), where a unit is lcm(C/G, B) channels: whole
// groups and whole blocks, contiguous in memory. Per task two passes: per-channel sums of d and
// d^2 with d = x minus the channel's first value (a shifted variance: as robust to a large input
// mean as a two-pass one, with one pass less), combined per group in double; then
// y = act((x - mean) * rstd * scale[c] + bias[c] (+ z)).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "nchwc_block.h"

namespace gn_nchwc {

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

enum Activation { kNone = 0, kRelu = 1, kHardSwish = 2, kQuickGelu = 3 };

constexpr int64_t kChunkValues = 4096;
constexpr int kUnroll = 4;  // positions in flight: independent accumulator chains
// channel_stats adds the chains as (c0 + c1) + (c2 + c3): another count must change that sum too
static_assert(kUnroll == 4, "channel_stats combines exactly four accumulator chains");

// One block row (B floats, one per channel) as a compiler vector: AVX/AVX-512 registers where the
// target has them, narrower ones otherwise.
template <int B> struct Row;
template <> struct Row<8> { typedef float type __attribute__((vector_size(32))); };
template <> struct Row<16> { typedef float type __attribute__((vector_size(64))); };

template <int B>
inline typename Row<B>::type load(const float* p) {
  typename Row<B>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int B>
inline void store(float* p, typename Row<B>::type v) { std::memcpy(p, &v, sizeof v); }

// The same row in double lanes (a pair of registers on AVX-512).
template <int B> struct Wide;
template <> struct Wide<8> { typedef double type __attribute__((vector_size(64))); };
template <> struct Wide<16> { typedef double type __attribute__((vector_size(128))); };

// Per-channel mean and sum of squared deviations from it (m2), over the positions of one unit's
// blocks, in one pass over x: the sums of d and d^2 with d = x - k, k the channel's first value.
// Shifting by a value of the channel keeps the squares small for inputs with a large mean, as a
// two-pass variance does. Float lanes within a chunk of positions (four independent chains,
// added as vectors), double lanes across chunks and for the moments.
template <int B>
void channel_stats(const float* x, int64_t blocks, int64_t spatial, double* mean, double* m2) {
  using V = typename Row<B>::type;
  using W = typename Wide<B>::type;
  const int64_t chunk = kChunkValues / B;
  const double positions = static_cast<double>(spatial);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = x + blk * spatial * B;
    const V k = load<B>(xb);
    W t1 = {}, t2 = {};
    for (int64_t start = 0; start < spatial; start += chunk) {
      const int64_t end = std::min(start + chunk, spatial);
      V a1[kUnroll] = {}, a2[kUnroll] = {};
      int64_t p = start;
      for (; p + kUnroll <= end; p += kUnroll) {
        for (int u = 0; u < kUnroll; ++u) {
          const V d = load<B>(xb + (p + u) * B) - k;
          a1[u] += d;
          a2[u] += d * d;
        }
      }
      for (; p < end; ++p) {
        const V d = load<B>(xb + p * B) - k;
        a1[0] += d;
        a2[0] += d * d;
      }
      t1 += __builtin_convertvector((a1[0] + a1[1]) + (a1[2] + a1[3]), W);
      t2 += __builtin_convertvector((a2[0] + a2[1]) + (a2[2] + a2[3]), W);
    }
    const W offset = t1 / positions;  // the channel's mean minus k
    const W mu = __builtin_convertvector(k, W) + offset;
    const W dev = t2 - t1 * offset;  // sum (x - mu)^2 = sum d^2 - (sum d)^2 / n
    std::memcpy(mean + blk * B, &mu, sizeof mu);
    std::memcpy(m2 + blk * B, &dev, sizeof dev);
  }
}

// exp(x) for x in [-87, 87] (clamped): 2^n * p(f), f = x - n ln2 in [-ln2/2, ln2/2], p of degree 6
// (relative error about 2e-7); n by the 1.5 * 2^23 rounding trick, 2^n built in the exponent bits.
template <int B>
inline typename Row<B>::type exp_row(typename Row<B>::type x) {
  using V = typename Row<B>::type;
  typedef int32_t I __attribute__((vector_size(sizeof(V))));
  const V zero = {}, lo = zero - 87.0f, hi = zero + 87.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const V f = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  V p = zero + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <int B, bool Residual, int Act>
void apply(const Job& job, int64_t blocks, const float* x, const float* z, float* y, const float* shift,
           const float* scale, const float* bias) {  // y may be x: each row is read before it is written
  using V = typename Row<B>::type;
  const V zero = {}, one = zero + 1.0f;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const V m = load<B>(shift + blk * B), a = load<B>(scale + blk * B), b = load<B>(bias + blk * B);
    const int64_t base = blk * job.spatial * B;
    for (int64_t p = 0; p < job.spatial; ++p) {
      const int64_t at = base + p * B;
      V v = (load<B>(x + at) - m) * a + b;
      if (Residual) v += load<B>(z + at);
      if (Act == kRelu) v = v > zero ? v : zero;
      if (Act == kHardSwish) {
        V g = v * job.alpha + job.beta;
        g = g < zero ? zero : g;
        v = v * (g > one ? one : g);
      }
      if (Act == kQuickGelu) v = v / (one + exp_row<B>(v * -job.alpha));
      store<B>(y + at, v);
    }
  }
}

template <int B, bool Residual>
void apply_activation(const Job& job, int64_t blocks, const float* x, const float* z, float* y, const float* shift,
                      const float* scale, const float* bias) {
  switch (job.activation) {
    case kRelu: return apply<B, Residual, kRelu>(job, blocks, x, z, y, shift, scale, bias);
    case kHardSwish: return apply<B, Residual, kHardSwish>(job, blocks, x, z, y, shift, scale, bias);
    case kQuickGelu: return apply<B, Residual, kQuickGelu>(job, blocks, x, z, y, shift, scale, bias);
    default: return apply<B, Residual, kNone>(job, blocks, x, z, y, shift, scale, bias);
  }
}

template <int B>
void normalize_unit(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t n = static_cast<int64_t>(task) / job.units;
  const int64_t c0 = (static_cast<int64_t>(task) % job.units) * job.unit;
  const int64_t count = std::min(c0 + job.unit, job.padded) - c0;  // a multiple of B
  const int64_t offset = (n * job.padded + c0) * job.spatial;
  const float* x = job.x + offset;
  float* shift = job.scratch + 3 * job.unit * static_cast<int64_t>(task);  // this task's own slice
  float* a = shift + job.unit;
  float* b = a + job.unit;
  double* mean = job.sums + 2 * job.unit * static_cast<int64_t>(task);
  double* m2 = mean + job.unit;
  const int64_t real = std::max<int64_t>(0, std::min(count, job.channels - c0));  // channels past C: padding
  const int64_t groups = real / job.group_channels;
  const double n_channel = static_cast<double>(job.spatial);
  channel_stats<B>(x, count / B, job.spatial, mean, m2);
  for (int64_t g = 0; g < groups; ++g) {
    // The group's mean and squared deviations from the channels' (Chan et al.'s pairwise update):
    // sum over channels of m2 + n (mean_c - mean_g)^2.
    const int64_t first = g * job.group_channels, last = first + job.group_channels;
    double total = 0.0;
    for (int64_t c = first; c < last; ++c) total += mean[c];
    const double mu = total / static_cast<double>(job.group_channels);
    double squares = 0.0;
    for (int64_t c = first; c < last; ++c) {
      const double k = mean[c] - mu;
      squares += m2[c] + n_channel * k * k;
    }
    const double var = std::max(0.0, squares / (n_channel * job.group_channels));
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + job.epsilon));
    const float center = static_cast<float>(mu);
    for (int64_t c = first; c < last; ++c) {
      shift[c] = center;
      a[c] = rstd * job.scale[c0 + c];
      b[c] = job.bias[c0 + c];
    }
  }
  for (int64_t c = groups * job.group_channels; c < count; ++c) shift[c] = a[c] = b[c] = 0.0f;  // padding: y = 0
  const float* z = job.z == nullptr ? nullptr : job.z + offset;
  float* y = job.y + offset;
  const int64_t blocks = count / B;
  if (z != nullptr) apply_activation<B, true>(job, blocks, x, z, y, shift, a, b);
  else apply_activation<B, false>(job, blocks, x, z, y, shift, a, b);
}

// Squeeze-excite's gating on the blocked layout: y[n, c, p] = x[n, c, p] * s[n, c], one task per
// (sample, block). S is [N, Cs, 1, 1], plain (Cs = C) or blocked (Cs = Cp): the same memory order.
struct ScaleJob {
  const float* x;
  const float* s;
  float* y;
  int64_t channels, padded, spatial, gate_channels;
};

template <int B>
void scale_block(void* data, size_t task) {
  using V = typename Row<B>::type;
  const ScaleJob& job = *static_cast<const ScaleJob*>(data);
  const int64_t blocks = job.padded / B;
  const int64_t n = static_cast<int64_t>(task) / blocks, c0 = (static_cast<int64_t>(task) % blocks) * B;
  float gate[B];
  for (int l = 0; l < B; ++l) gate[l] = c0 + l < job.channels ? job.s[n * job.gate_channels + c0 + l] : 0.0f;
  const V g = load<B>(gate);
  const int64_t offset = (n * job.padded + c0) * job.spatial;
  for (int64_t p = 0; p < job.spatial; ++p) store<B>(job.y + offset + p * B, load<B>(job.x + offset + p * B) * g);
}

// Y is X's buffer (onnxruntime's alias map): the result is written over the input, which is in
// cache after the statistics pass, with no second buffer to fill. Only for an X that nothing else
// reads: nchwc.py fuses a GroupNorm only then.
size_t ORT_API_CALL alias_input(int** input_index, int** output_index) {
  *input_index = new int[1]{0};
  *output_index = new int[1]{0};
  return 1;
}

void ORT_API_CALL release_alias(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

}  // namespace gn_nchwc

// The kernel: inputs X (blocked), scale [C], bias [C], optional Z (blocked residual); attributes
// num_groups, epsilon, channels (C), block (B: 8 or 16, the block the model was written for: kernel
// creation fails with one line when it is not this CPU's, nchwc_block.h), activation ("", "Relu", "HardSwish":
// v * clip(alpha v + beta, 0, 1), or "QuickGelu": v * sigmoid(alpha v)), alpha, beta.
struct GroupNormNchwcKernel {
  GroupNormNchwcKernel(const OrtApi* api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    groups_ = kernel_info.GetAttribute<int64_t>("num_groups");
    epsilon_ = kernel_info.GetAttribute<float>("epsilon");
    channels_ = kernel_info.GetAttribute<int64_t>("channels");
    block_ = kernel_info.GetAttribute<int64_t>("block");
    const std::string activation = kernel_info.GetAttribute<std::string>("activation");
    const char* names[] = {"", "Relu", "HardSwish", "QuickGelu"};
    activation_ = -1;
    for (int i = 0; i < 4; ++i) {
      if (activation == names[i]) activation_ = i;
    }
    alpha_ = optional_float(api, info, "alpha", 1.0f);
    beta_ = optional_float(api, info, "beta", 0.0f);
    if (groups_ < 1 || channels_ % groups_ != 0 || (block_ != 8 && block_ != 16) || activation_ < 0) {
      ORT_CXX_API_THROW("GroupNormNchwc: num_groups must divide channels, block must be 8 or 16, and the "
                        "activation one of '', Relu, HardSwish, QuickGelu", ORT_INVALID_ARGUMENT);
    }
    const std::string mismatch = gn_nchwc::block_mismatch("GroupNormNchwc", block_);
    if (!mismatch.empty()) ORT_CXX_API_THROW(mismatch, ORT_FAIL);
  }

  static float optional_float(const OrtApi* api, const OrtKernelInfo* info, const char* name, float fallback) {
    float value = fallback;
    OrtStatus* status = api->KernelInfoGetAttribute_float(info, name, &value);
    if (status != nullptr) {
      api->ReleaseStatus(status);
      return fallback;
    }
    return value;
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& scale, const Ort::Custom::Tensor<float>& bias,
                      std::optional<const Ort::Custom::Tensor<float>*> Z, Ort::Custom::Tensor<float>& Y) {
    const std::vector<int64_t>& shape = X.Shape();
    if (shape.size() != 4) return Ort::Status("GroupNormNchwc: X must be [N, Cp, H, W]", ORT_INVALID_ARGUMENT);
    const int64_t padded = shape[1];
    if (padded % block_ != 0 || padded < channels_ || padded - channels_ >= block_) {
      return Ort::Status("GroupNormNchwc: X's channels do not match the channels and block attributes",
                         ORT_INVALID_ARGUMENT);
    }
    if (scale.NumberOfElement() != channels_ || bias.NumberOfElement() != channels_) {
      return Ort::Status("GroupNormNchwc: scale and bias need one value per channel", ORT_INVALID_ARGUMENT);
    }
    const float* z = nullptr;
    if (Z.has_value() && *Z != nullptr) {
      if ((*Z)->Shape() != shape) return Ort::Status("GroupNormNchwc: Z must have X's shape", ORT_INVALID_ARGUMENT);
      z = (*Z)->Data();
    }
    float* y = Y.Allocate(shape);
    const int64_t group_channels = channels_ / groups_;
    const int64_t unit = std::lcm(group_channels, block_);
    const int64_t units = (padded + unit - 1) / unit;
    const size_t tasks = static_cast<size_t>(shape[0] * units);
    if (tasks == 0 || shape[2] * shape[3] == 0) return Ort::Status(nullptr);
    // Every task writes its slice before reading it: no zero-filling (a memset as large as a
    // 7x7 activation's tenth, on every call).
    const std::unique_ptr<float[]> scratch(new float[3 * unit * tasks]);
    const std::unique_ptr<double[]> sums(new double[2 * unit * tasks]);
    gn_nchwc::Job job{X.Data(), z, scale.Data(), bias.Data(), y, channels_, padded, shape[2] * shape[3],
                      group_channels, unit, units, epsilon_, activation_, alpha_, beta_, scratch.get(),
                      sums.get()};
    Ort::KernelContext(context).ParallelFor(block_ == 16 ? gn_nchwc::normalize_unit<16> : gn_nchwc::normalize_unit<8>,
                                            tasks, 0, &job);
    return Ort::Status(nullptr);
  }

  int64_t groups_ = 0;
  float epsilon_ = 1e-5f;
  int64_t channels_ = 0;
  int64_t block_ = 0;
  int activation_ = 0;
  float alpha_ = 1.0f;
  float beta_ = 0.0f;
};

// The kernel: inputs X (blocked), S ([N, C or Cp, 1, 1]); attributes channels (C), block (B, checked as above).
struct ScaleNchwcKernel {
  ScaleNchwcKernel(const OrtApi* api, const OrtKernelInfo* info) {
    (void)api;
    Ort::ConstKernelInfo kernel_info(info);
    channels_ = kernel_info.GetAttribute<int64_t>("channels");
    block_ = kernel_info.GetAttribute<int64_t>("block");
    if (block_ != 8 && block_ != 16) ORT_CXX_API_THROW("ScaleNchwc: block must be 8 or 16", ORT_INVALID_ARGUMENT);
    const std::string mismatch = gn_nchwc::block_mismatch("ScaleNchwc", block_);
    if (!mismatch.empty()) ORT_CXX_API_THROW(mismatch, ORT_FAIL);
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& S, Ort::Custom::Tensor<float>& Y) {
    const std::vector<int64_t>& shape = X.Shape();
    const std::vector<int64_t>& gate = S.Shape();
    if (shape.size() != 4 || shape[1] % block_ != 0 || shape[1] < channels_) {
      return Ort::Status("ScaleNchwc: X must be [N, Cp, H, W] with Cp the channels padded to the block",
                         ORT_INVALID_ARGUMENT);
    }
    if (gate.size() != 4 || gate[0] != shape[0] || gate[1] < channels_ || gate[1] > shape[1] || gate[2] != 1 ||
        gate[3] != 1) {
      return Ort::Status("ScaleNchwc: S must be [N, C, 1, 1]", ORT_INVALID_ARGUMENT);
    }
    float* y = Y.Allocate(shape);
    gn_nchwc::ScaleJob job{X.Data(), S.Data(), y, channels_, shape[1], shape[2] * shape[3], gate[1]};
    const size_t tasks = static_cast<size_t>(shape[0] * (shape[1] / block_));
    if (tasks == 0 || job.spatial == 0) return Ort::Status(nullptr);
    Ort::KernelContext(context).ParallelFor(block_ == 16 ? gn_nchwc::scale_block<16> : gn_nchwc::scale_block<8>,
                                            tasks, 0, &job);
    return Ort::Status(nullptr);
  }

  int64_t channels_ = 0;
  int64_t block_ = 0;
};
