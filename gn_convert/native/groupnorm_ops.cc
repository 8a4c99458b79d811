// Native CPU kernel for ai.gn_convert::GroupNorm, loaded into onnxruntime with
// SessionOptions.register_custom_ops_library (Triton: op_library_filename).
//
// The op's ONNX function body stays in the model; onnxruntime prefers a registered kernel
// over inlining the body, so the same artifact runs with or without this library.
//
// One task per (sample, group) on onnxruntime's intra-op thread pool; the arithmetic
// (groupnorm_kernels.h) is compiled for several instruction sets and the best one this CPU runs is
// chosen when the library loads (kernel_dispatch.h), so one file serves every x86-64 server.
//
// GroupNormNchwc (groupnorm_nchwc.h) is the same op on onnxruntime's blocked layout, and
// ScaleNchwc squeeze-excite's gating there, for graphs rewritten by gn_convert/native/nchwc.py;
// both refuse, when onnxruntime creates them, a model written for another CPU's block (nchwc_block.h).
//
// onnxruntime's C API is negotiated when the library is registered (RegisterCustomOps below): the
// library asks for min(the runtime's API version, the headers' ORT_API_VERSION), as
// onnxruntime-extensions does, so one build loads on every onnxruntime from kMinApiVersion on,
// older or newer than the headers it was compiled against.
//
// Built by gn_convert/native/build.py (at run time, or into the wheel by setup.py) against
// onnxruntime's C/C++ API headers.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "groupnorm_nchwc.h"
#include "kernel_dispatch.h"

namespace {

constexpr const char* kDomain = "ai.gn_convert";

template <typename T> gn_dispatch::TaskFn group_task(const gn_dispatch::Kernels& k);
template <> gn_dispatch::TaskFn group_task<float>(const gn_dispatch::Kernels& k) { return k.group_f32; }
template <> gn_dispatch::TaskFn group_task<Ort::Float16_t>(const gn_dispatch::Kernels& k) { return k.group_f16; }
template <> gn_dispatch::TaskFn group_task<Ort::BFloat16_t>(const gn_dispatch::Kernels& k) { return k.group_bf16; }

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
    gn_plain::Job<T> job{gn_ort::input_data<T>(context, 0), gn_ort::input_data<T>(context, 1),
                         gn_ort::input_data<T>(context, 2), y, groups_, channels / groups_, spatial, epsilon_};
    Ort::KernelContext(context).ParallelFor(group_task<T>(gn_dispatch::kernels()), static_cast<size_t>(batch * groups_),
                                            0, &job);
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

// The instruction-set variant the kernels run on this CPU ("avx512", "avx2" or "baseline", kernel_dispatch.h).
extern "C" ORT_EXPORT const char* GnConvertKernelIsa() { return gn_dispatch::kernels().name; }

namespace {

// The oldest C API this library runs on: the newest OrtApi function its code calls is
// KernelContext_ParallelFor (API 17; inputs are read with input_data, not the lite API's GetTensorData of
// API 23); the lite ops need CreateKernelV2 and KernelComputeV2 (16). tests/test_native_dispatch.py reads
// the calls from the built library's machine code and checks them against this number.
constexpr int kMinApiVersion = 17;

// The C API version an onnxruntime serves: its minor version number ("1.32.0" -> 32), as
// onnxruntime-extensions reads it; 0 when the string is not of that form.
int runtime_api_version(const OrtApiBase* api_base) {
  const std::string version = api_base->GetVersionString();
  const size_t dot = version.find('.');
  if (dot == std::string::npos || version.compare(0, dot, "1") != 0) return 0;
  return std::atoi(version.c_str() + dot + 1);
}

}  // namespace

// The C API version this library uses on the onnxruntime at hand: min(runtime, headers), as
// onnxruntime-extensions negotiates it; set when onnxruntime registers the library (0 before).
static int negotiated_api_version = 0;
extern "C" ORT_EXPORT int GnConvertOrtApiVersion() { return negotiated_api_version; }

// The C API version of the headers the library was compiled against, and the oldest it runs on.
extern "C" ORT_EXPORT int GnConvertCompiledApiVersion() { return ORT_API_VERSION; }
extern "C" ORT_EXPORT int GnConvertMinApiVersion() { return kMinApiVersion; }

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const int runtime = runtime_api_version(api_base);
  const int version = runtime > 0 ? std::min(runtime, ORT_API_VERSION) : ORT_API_VERSION;
  const OrtApi* api = version >= kMinApiVersion ? api_base->GetApi(version) : nullptr;
  if (api == nullptr) {  // too old for the calls this library makes: say so through the oldest API
    const std::string message = std::string("gn_convert native ops need onnxruntime C API ") +
                                std::to_string(kMinApiVersion) + " or newer (onnxruntime 1." +
                                std::to_string(kMinApiVersion) + "); this onnxruntime is " +
                                api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  static std::mutex lock;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> kernels;
  std::lock_guard<std::mutex> guard(lock);
  if (domain && version != negotiated_api_version) {  // one process holds one onnxruntime
    return api->CreateStatus(ORT_FAIL, "gn_convert native ops were registered with another onnxruntime C API "
                                       "version in this process");
  }
  Ort::InitApi(api);
  negotiated_api_version = version;
  try {
    if (!domain) {
      const char* ep = "CPUExecutionProvider";
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormKernel<float>>("GroupNorm", ep));
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormKernel<Ort::Float16_t>>("GroupNorm", ep));
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormKernel<Ort::BFloat16_t>>("GroupNorm", ep));
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<GroupNormNchwcKernel>("GroupNormNchwc", ep));
      kernels.back()->GetAliasMap = gn_nchwc::alias_input;  // read by onnxruntime only from the API that has it
      kernels.back()->ReleaseAliasMap = gn_nchwc::release_alias;
      kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<ScaleNchwcKernel>("ScaleNchwc", ep));
      // The lite ops declare the headers' version; onnxruntime hands each op the OrtApi of the version it
      // declares (older releases refuse a version newer than theirs), so each declares the negotiated one.
      for (const auto& kernel : kernels) kernel->version = static_cast<uint32_t>(version);
      domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
      for (const auto& kernel : kernels) domain->Add(kernel.get());
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& err) {
    return api->CreateStatus(ORT_FAIL, err.what());
  }
  return nullptr;
}
