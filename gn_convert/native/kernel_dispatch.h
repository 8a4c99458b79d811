// Run-time instruction-set dispatch: the kernels' arithmetic (groupnorm_kernels.h) is compiled here
// once for the library's own target (-march, x86-64-v2 for a library that ships), once for AVX2+FMA and
// once for AVX-512 (F, DQ, BW, VL), each in its own namespace under GCC's target pragma, and
// kernels() picks the best variant this CPU and its OS run, once per process (cpu_features.h). So one
// file runs on any x86-64 server at the speed of a build for its CPU, where -march=native would die
// with SIGILL on an older one. Which variant runs does not change what a blocked model needs: its
// block (8 or 16) is the model's attribute, checked against this CPU's (nchwc_block.h), and every
// variant computes both blocks.
//
// GN_CONVERT_KERNEL_ISA=baseline|avx2|avx512 asks for a variant (the tests run each one); one this CPU
// lacks, or an unknown name, is ignored. GnConvertKernelIsa() (groupnorm_ops.cc) says which one runs.
//
// Only GCC builds for x86-64 have the AVX2 and AVX-512 variants (clang spells the target pragma
// differently; elsewhere there is nothing to choose): other builds run their own target's code.
// Included by groupnorm_ops.cc after onnxruntime's C++ header (Ort::Float16_t, Ort::BFloat16_t).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_features.h"
#include "groupnorm_jobs.h"

namespace gn_dispatch {

using TaskFn = void (*)(void*, size_t);

// One variant's entry points: onnxruntime's ParallelFor calls them once per task.
struct Kernels {
  const char* name;
  TaskFn group_f32, group_f16, group_bf16;  // plain layout, per (sample, group)
  TaskFn unit8, unit16;                      // blocked layout, per (sample, unit), block 8 or 16
  TaskFn scale8, scale16;                    // squeeze-excite's gating on the blocked layout
};

}  // namespace gn_dispatch

#define GN_ISA gn_baseline
#define GN_ISA_NAME "baseline"
#include "groupnorm_kernels.h"
#undef GN_ISA
#undef GN_ISA_NAME

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define GN_CONVERT_DISPATCH 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GN_ISA gn_avx2
#define GN_ISA_NAME "avx2"
#include "groupnorm_kernels.h"
#undef GN_ISA
#undef GN_ISA_NAME
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define GN_ISA gn_avx512
#define GN_ISA_NAME "avx512"
#include "groupnorm_kernels.h"
#undef GN_ISA
#undef GN_ISA_NAME
#pragma GCC pop_options

#else
#define GN_CONVERT_DISPATCH 0
#endif

namespace gn_dispatch {

// The variant to run: the best one `cpu` runs, or `wanted` where this CPU runs it.
inline const Kernels& select(const gn_cpu::Features& cpu, const char* wanted) {
  const Kernels* usable[3] = {};
  int count = 0;
#if GN_CONVERT_DISPATCH
  if (cpu.avx2_fma && cpu.avx512_dq_bw_vl) usable[count++] = &gn_avx512::kKernels;
  if (cpu.avx2_fma) usable[count++] = &gn_avx2::kKernels;
#else
  (void)cpu;
#endif
  usable[count++] = &gn_baseline::kKernels;
  for (int i = 0; wanted != nullptr && i < count; ++i) {
    if (std::strcmp(usable[i]->name, wanted) == 0) return *usable[i];
  }
  return *usable[0];
}

inline const Kernels& kernels() {
  static const Kernels& chosen = select(gn_cpu::features(), std::getenv("GN_CONVERT_KERNEL_ISA"));
  return chosen;
}

}  // namespace gn_dispatch
