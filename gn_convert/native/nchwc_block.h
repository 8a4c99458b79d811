// This CPU's NCHWc block size as onnxruntime's MLAS chooses it, for the blocked kernels
// (GroupNormNchwc, ScaleNchwc) to refuse a model written for another block when onnxruntime creates
// them: a blocked model embeds convolution weights reordered for one block size, and run with
// another it would give wrong numbers, not an error.
//
// MLAS_PLATFORM's constructor (onnxruntime/core/mlas/lib/platform.cpp, read for onnxruntime 1.32)
// sets NchwcBlockSize = 8 on every x86-64 CPU (SSE2 kernels at least) and raises it to 16 only
// inside these nested checks: AVX and OSXSAVE (CPUID.1:ECX bits 28 and 27) with the OS saving
// the SSE and AVX state (XCR0 & 0x6); then FMA (CPUID.1:ECX bit 12) and AVX2 (CPUID.7.0:EBX
// bit 5); then AVX512F (CPUID.7.0:EBX bit 16) with the OS saving the opmask and ZMM state
// (XCR0 & 0xE0). The same tests are made here, with the same bits. Elsewhere (ARM64, whose NCHWc
// block is a constant of onnxruntime's build) the block cannot be derived: 0, and the kernels
// refuse to run a blocked model there rather than guess.
#pragma once

#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace gn_nchwc {

inline int cpu_block_size() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned eax = 0, ebx = 0, ecx1 = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx1, &edx)) return 8;
  if ((ecx1 & 0x18000000u) != 0x18000000u) return 8;  // no AVX or no OSXSAVE: SSE kernels, block 8
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  if ((xcr0 & 0x6) != 0x6) return 8;
  unsigned ebx7 = 0, ecx7 = 0, edx7 = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx7, &ecx7, &edx7)) return 8;
  const bool avx2_fma = (ecx1 & 0x1000u) != 0 && (ebx7 & 0x20u) != 0;
  const bool avx512f = (ebx7 & 0x10000u) != 0 && (xcr0 & 0xE0) == 0xE0;
  return avx2_fma && avx512f ? 16 : 8;
#else
  return 0;
#endif
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
