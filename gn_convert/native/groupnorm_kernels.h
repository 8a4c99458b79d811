// The kernels' arithmetic, compiled once per instruction set: kernel_dispatch.h includes this file
// several times, each time inside `namespace GN_ISA` under that set's target pragma (no include
// guard on purpose), and picks one variant at run time. Everything here is in that namespace, so no
// function compiled for AVX-512 can be merged by the linker into another variant's calls; what it
// calls from outside (std::, onnxruntime's float16 conversions) is compiled for the baseline target.
//
// GroupNorm on the plain layout: one task per (sample, group), the group's Cg*S values contiguous in
// NCHW. Three passes over the block -- the mean, the mean of squared deviations (two-pass variance,
// robust to inputs with a large mean, as the function body), then y = (x - mean) * rstd * scale[c] +
// bias[c] -- the second and third from cache for the blocks of common CNNs.
//
// GroupNorm on the blocked layout ([N, Cp, H, W], B channels interleaved, groupnorm_nchwc.h): one task
// per (sample, unit), a unit being lcm(C/G, B) channels: whole groups and whole blocks, contiguous in
// memory. Per task two passes: per-channel sums of d and d^2 with d = x minus the channel's first
// value (a shifted variance: as robust to a large input mean as a two-pass one, with one pass less),
// combined per group in double; then y = act((x - mean) * rstd * scale[c] + bias[c] (+ z)).
#ifndef GN_ISA
#error "groupnorm_kernels.h is included by kernel_dispatch.h, with GN_ISA naming the variant's namespace"
#endif

namespace GN_ISA {

using gn_nchwc::Job;
using gn_nchwc::ScaleJob;
using gn_nchwc::kHardSwish;
using gn_nchwc::kNone;
using gn_nchwc::kQuickGelu;
using gn_nchwc::kRelu;

constexpr int kLanes = 16;       // independent float accumulators: vectorisable, no reassociation
constexpr int64_t kChunk = 4096;  // values summed in float before the chunk goes into a double

inline float to_float(float v) { return v; }
inline float to_float(Ort::Float16_t v) { return v.ToFloat(); }
inline float to_float(Ort::BFloat16_t v) { return v.ToFloat(); }
template <typename T> T from_float(float v) { return T(v); }
template <> inline float from_float<float>(float v) { return v; }

// Sum of (x[i] - shift)^Power over n values: float lanes within a chunk, double across chunks.
template <int Power, typename T>
double chunked_sum(const T* x, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = start + kChunk < n ? start + kChunk : n;
    float acc[kLanes] = {0.0f};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float d = to_float(x[i + j]) - shift;
        acc[j] += Power == 1 ? d : d * d;
      }
    }
    for (; i < end; ++i) {
      const double d = static_cast<double>(to_float(x[i])) - shift;
      total += Power == 1 ? d : d * d;
    }
    for (int j = 0; j < kLanes; ++j) total += acc[j];
  }
  return total;
}

template <typename T>
void normalize_group(void* data, size_t task) {
  const gn_plain::Job<T>& job = *static_cast<const gn_plain::Job<T>*>(data);
  const int64_t block = job.channels_per_group * job.spatial;
  const int64_t offset = static_cast<int64_t>(task) * block;
  const T* x = job.x + offset;
  T* y = job.y + offset;
  const float mean = static_cast<float>(chunked_sum<1>(x, block, 0.0f) / block);
  const double var = chunked_sum<2>(x, block, mean) / block;
  const float rstd = static_cast<float>(1.0 / std::sqrt(var + job.epsilon));
  const int64_t first_channel = (static_cast<int64_t>(task) % job.groups) * job.channels_per_group;
  for (int64_t c = 0; c < job.channels_per_group; ++c) {
    const float a = rstd * to_float(job.scale[first_channel + c]);
    const float b = to_float(job.bias[first_channel + c]);
    const T* xc = x + c * job.spatial;
    T* yc = y + c * job.spatial;
    for (int64_t i = 0; i < job.spatial; ++i) yc[i] = from_float<T>((to_float(xc[i]) - mean) * a + b);
  }
}

constexpr int64_t kChunkValues = 4096;
constexpr int kUnroll = 4;  // positions in flight: independent accumulator chains
// channel_stats adds the chains as (c0 + c1) + (c2 + c3): another count must change that sum too
static_assert(kUnroll == 4, "channel_stats combines exactly four accumulator chains");

// One block row (B floats, one per channel) as a compiler vector: AVX/AVX-512 registers where the
// variant's target has them, narrower ones otherwise.
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

// This variant's entry points (gn_dispatch::Kernels, kernel_dispatch.h).
constexpr gn_dispatch::Kernels kKernels = {
    GN_ISA_NAME,
    normalize_group<float>, normalize_group<Ort::Float16_t>, normalize_group<Ort::BFloat16_t>,
    normalize_unit<8>, normalize_unit<16>, scale_block<8>, scale_block<16>,
};

}  // namespace GN_ISA
