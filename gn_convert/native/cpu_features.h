// What this x86-64 CPU and its OS let a program run, read once with CPUID and XGETBV: the facts that
// both the kernels' instruction-set dispatch (kernel_dispatch.h) and onnxruntime's NCHWc block size
// (nchwc_block.h) are derived from, so that the two can never disagree.
//
// The bits are the ones onnxruntime's MLAS tests (onnxruntime/core/mlas/lib/platform.cpp, read for
// onnxruntime 1.32): AVX and OSXSAVE (CPUID.1:ECX bits 28 and 27) with the OS saving the SSE and
// AVX state (XCR0 & 0x6); FMA (CPUID.1:ECX bit 12) and AVX2 (CPUID.7.0:EBX bit 5); AVX512F
// (CPUID.7.0:EBX bit 16) with the OS saving the opmask and ZMM state (XCR0 & 0xE0). The AVX-512
// kernels also use AVX512DQ, BW and VL (EBX bits 17, 30, 31), which every AVX-512 server CPU has.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace gn_cpu {

struct Features {
  bool x86_64 = false;
  bool avx2_fma = false;    // AVX2 and FMA, with the OS saving the YMM state
  bool avx512f = false;     // AVX512F, with the OS saving the opmask and ZMM state
  bool avx512_dq_bw_vl = false;
};

inline Features read_features() {
  Features f;
#if defined(__x86_64__) || defined(_M_X64)
  f.x86_64 = true;
  unsigned eax = 0, ebx = 0, ecx1 = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx1, &edx)) return f;
  if ((ecx1 & 0x18000000u) != 0x18000000u) return f;  // no AVX or no OSXSAVE: SSE only
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  if ((xcr0 & 0x6) != 0x6) return f;
  unsigned ebx7 = 0, ecx7 = 0, edx7 = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx7, &ecx7, &edx7)) return f;
  f.avx2_fma = (ecx1 & 0x1000u) != 0 && (ebx7 & 0x20u) != 0;
  f.avx512f = (ebx7 & 0x10000u) != 0 && (xcr0 & 0xE0) == 0xE0;
  f.avx512_dq_bw_vl = f.avx512f && (ebx7 & 0x20000u) != 0 && (ebx7 & 0x40000000u) != 0 && (ebx7 & 0x80000000u) != 0;
#endif
  return f;
}

// Read once per process (a function-local static is initialised once, thread-safely).
inline const Features& features() {
  static const Features cached = read_features();
  return cached;
}

}  // namespace gn_cpu
