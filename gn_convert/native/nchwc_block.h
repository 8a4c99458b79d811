// This CPU's NCHWc block size as onnxruntime's MLAS chooses it, for the blocked kernels
// (GroupNormNchwc, ScaleNchwc) to refuse a model written for another block when onnxruntime creates
// them: a blocked model embeds convolution weights reordered for one block size, and run with
// another it would give wrong numbers, not an error.
//
// MLAS_PLATFORM's constructor (onnxruntime/core/mlas/lib/platform.cpp, read for onnxruntime 1.32)
// sets NchwcBlockSize = 8 on every x86-64 CPU (SSE2 kernels at least) and raises it to 16 only
// when the CPU has AVX2 and FMA and AVX512F and the OS saves their state (cpu_features.h reads the
// same bits). Elsewhere (ARM64, whose NCHWc block is a constant of onnxruntime's build) the block
// cannot be derived: 0, and the kernels refuse to run a blocked model there rather than guess.
#pragma once

#include <cstdint>
#include <string>

#include "cpu_features.h"

namespace gn_nchwc {

inline int cpu_block_size() {
  const gn_cpu::Features& f = gn_cpu::features();
  if (!f.x86_64) return 0;
  return f.avx2_fma && f.avx512f ? 16 : 8;
}

// One line: what the model was written for, what this CPU has, what to do. Empty when they agree.
inline std::string block_mismatch(const char* op, int64_t model_block) {
  const int cpu = cpu_block_size();
  if (model_block == cpu) return std::string();
  const std::string head = std::string(op) + ": this model was written for onnxruntime's blocked layout with block " +
                           std::to_string(model_block) + "; ";
  const std::string what = cpu == 0 ? "gn-convert's blocked kernels cannot tell this CPU's block (x86-64 only)"
                                    : "this CPU's block is " + std::to_string(cpu);
  return head + what + ": rewrite it here with `gn-convert native --blocked` or deploy the plain model";
}

}  // namespace gn_nchwc
