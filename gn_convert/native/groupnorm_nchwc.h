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
// zero and stay zero). The arithmetic is in groupnorm_kernels.h, compiled per instruction set
// (kernel_dispatch.h); this file checks the node and hands the tasks to onnxruntime's thread pool.
#pragma once

#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "groupnorm_jobs.h"
#include "kernel_dispatch.h"
#include "nchwc_block.h"

namespace gn_ort {

// The data of input `index`, through GetTensorMutableData (C API 1): the lite API's Tensor<T>::Data() calls
// GetTensorData, which onnxruntime has only from API 23, and would raise the library's floor to 1.23.
template <typename T>
const T* input_data(OrtKernelContext* context, size_t index) {
  const OrtValue* value = nullptr;
  Ort::ThrowOnError(Ort::GetApi().KernelContext_GetInput(context, index, &value));
  void* data = nullptr;
  Ort::ThrowOnError(Ort::GetApi().GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  return static_cast<const T*>(data);
}

}  // namespace gn_ort

namespace gn_nchwc {

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
      z = gn_ort::input_data<float>(context, 3);
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
    gn_nchwc::Job job{gn_ort::input_data<float>(context, 0), z, gn_ort::input_data<float>(context, 1),
                      gn_ort::input_data<float>(context, 2), y, channels_, padded, shape[2] * shape[3],
                      group_channels, unit, units, epsilon_, activation_, alpha_, beta_, scratch.get(),
                      sums.get()};
    const gn_dispatch::Kernels& kernels = gn_dispatch::kernels();
    Ort::KernelContext(context).ParallelFor(block_ == 16 ? kernels.unit16 : kernels.unit8, tasks, 0, &job);
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
    gn_nchwc::ScaleJob job{gn_ort::input_data<float>(context, 0), gn_ort::input_data<float>(context, 1), y,
                           channels_, shape[1], shape[2] * shape[3], gate[1]};
    const size_t tasks = static_cast<size_t>(shape[0] * (shape[1] / block_));
    if (tasks == 0 || job.spatial == 0) return Ort::Status(nullptr);
    const gn_dispatch::Kernels& kernels = gn_dispatch::kernels();
    Ort::KernelContext(context).ParallelFor(block_ == 16 ? kernels.scale16 : kernels.scale8, tasks, 0, &job);
    return Ort::Status(nullptr);
  }

  int64_t channels_ = 0;
  int64_t block_ = 0;
};
