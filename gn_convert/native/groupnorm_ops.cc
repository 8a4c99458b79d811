// Native CPU kernel for ai.gn_convert::GroupNorm, loaded into onnxruntime with
// SessionOptions.register_custom_ops_library (Triton: op_library_filename).
//
// The op's ONNX function body stays in the model; onnxruntime prefers a registered kernel
// over inlining the body, so the same artifact runs with or without this library.
//
// One task per (sample, group): the group's Cg*S values are contiguous in NCHW. Three
// passes over the block -- the mean, the mean of squared deviations (two-pass variance,
// robust to inputs with a large mean, as the function body), then
// y = (x - mean) * rstd * scale[c] + bias[c] -- the second and third from cache for the
// blocks of common CNNs. Tasks run on onnxruntime's intra-op thread pool.
//
// GroupNormNchwc (groupnorm_nchwc.h) is the same op on onnxruntime's blocked layout, and
// ScaleNchwc squeeze-excite's gating there, for graphs rewritten by gn_convert/native/nchwc.py;
// both refuse, when onnxruntime creates them, a model written for another CPU's block (nchwc_block.h).
//
// Built by gn_convert/native/build.py against onnxruntime's C/C++ API headers.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "groupnorm_nchwc.h"

namespace {

constexpr const char* kDomain = "ai.gn_convert";
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

template <typename T>
void normalize_group(void* data, size_t task) {
  const Job<T>& job = *static_cast<const Job<T>*>(data);
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

// Statistics and arithmetic in float32 for every input type, as the op's function body.
template <typename T>
struct GroupNormKernel {
  GroupNormKernel(const OrtApi* api, const OrtKernelInfo* info) {
    Ort::ThrowOnError(api->KernelInfoGetAttribute_int64(info, "num_groups", &groups_));
    if (groups_ < 1) ORT_CXX_API_THROW("GroupNorm: num_groups must be positive", ORT_INVALID_ARGUMENT);
    float epsilon = 0.0f;
    OrtStatus* status = api->KernelInfoGetAttribute_float(info, "epsilon", &epsilon);
    if (status == nullptr) {
      epsilon_ = epsilon;
    } else {
      api->ReleaseStatus(status);  // absent: the schema's default
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<T>& X,
                      const Ort::Custom::Tensor<T>& scale, const Ort::Custom::Tensor<T>& bias,
                      Ort::Custom::Tensor<T>& Y) {
    const std::vector<int64_t>& shape = X.Shape();
    if (shape.size() < 3) return Ort::Status("GroupNorm: X must have rank >= 3", ORT_INVALID_ARGUMENT);
    const int64_t batch = shape[0];
    const int64_t channels = shape[1];
    int64_t spatial = 1;
    for (size_t i = 2; i < shape.size(); ++i) spatial *= shape[i];
    if (channels % groups_ != 0) {
      return Ort::Status("GroupNorm: num_groups does not divide the channel count", ORT_INVALID_ARGUMENT);
    }
    if (scale.NumberOfElement() != channels || bias.NumberOfElement() != channels) {
      return Ort::Status("GroupNorm: scale and bias need one value per channel", ORT_INVALID_ARGUMENT);
    }
    T* y = Y.Allocate(shape);
    if (batch == 0 || spatial == 0) return Ort::Status(nullptr);
    Job<T> job{X.Data(), scale.Data(), bias.Data(), y, groups_, channels / groups_, spatial, epsilon_};
    Ort::KernelContext(context).ParallelFor(normalize_group<T>, static_cast<size_t>(batch * groups_), 0, &job);
    return Ort::Status(nullptr);
  }

  int64_t groups_ = 0;
  float epsilon_ = 1e-5f;
};

}  // namespace

#ifndef GN_CONVERT_MARCH
#define GN_CONVERT_MARCH "unknown"
#endif

// The build's -march, readable in the file without loading it (gn_convert/native/build.py: library_target).
extern "C" ORT_EXPORT __attribute__((used)) const char GnConvertBuildTarget[] =
    "gn_convert_build_target=-march=" GN_CONVERT_MARCH;

// This CPU's NCHWc block as the blocked kernels see it (nchwc_block.h); the tests compare it with the
// block onnxruntime's own reorder pads to.
extern "C" ORT_EXPORT int GnConvertNchwcBlockSize() { return gn_nchwc::cpu_block_size(); }

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an onnxruntime older than these headers: say so through the oldest API
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "gn_convert native ops were built against newer onnxruntime headers; rebuild them "
                  "(gn-convert native --force) against this onnxruntime");
  }
  Ort::InitApi(api);
  static std::mutex lock;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> kernels;
  std::lock_guard<std::mutex> guard(lock);
  try {
    if (!domain) {
      const char* ep = "CPUExecutionProvider";
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormKernel<float>>("GroupNorm", ep));
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormKernel<Ort::Float16_t>>("GroupNorm", ep));
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormKernel<Ort::BFloat16_t>>("GroupNorm", ep));
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormNchwcKernel>("GroupNormNchwc", ep));
      kernels.back()->GetAliasMap = gn_nchwc::alias_input;
      kernels.back()->ReleaseAliasMap = gn_nchwc::release_alias;
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<ScaleNchwcKernel>("ScaleNchwc", ep));
      domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
      for (const auto& kernel : kernels) domain->Add(kernel.get());
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& err) {
    return api->CreateStatus(ORT_FAIL, err.what());
  }
  return nullptr;
}
