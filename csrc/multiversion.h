// One build serves every x86-64 CPU: GCC compiles a kernel marked GK_MULTIVERSION for
// AVX-512, AVX2 and the baseline, and the loader picks the clone for the CPU it runs on.
// Helpers a kernel calls must be inlined into it (GK_INLINE) to be compiled for the clone.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define GK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GK_MULTIVERSION
#endif
#define GK_INLINE inline __attribute__((always_inline))
