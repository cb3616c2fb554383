// GGUF-block matrix products for edgellm's ONNX Runtime custom op (see block_matmul.cpp).
#pragma once
#include <cstdint>

enum BlockFormat { FMT_Q4_0 = 0, FMT_Q4_1 = 1, FMT_Q8_0 = 2 };

// Activation rows quantized per block of 32: q (m x k) int8, d and s (m x k/32): scale and scale * sum(q).
struct QuantizedRows {
    int64_t m, k, blocks;
    const int8_t* q;
    const float* d;
    const float* s;
};

#define EDGELLM_EXPORT extern "C" __attribute__((visibility("default")))

int block_bytes(int fmt);
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* d, float* s);
// Output columns of 8-row groups [g_begin, g_end) of the (m x n) row-major y; w in the x8 layout
// (ceil(n/8) groups of k/32 group-blocks, 8 * block bytes each).
void matmul_groups(const QuantizedRows* a, const uint8_t* w, int fmt, int64_t n, int64_t g_begin, int64_t g_end,
                   float* y);
// Row `row` of x8-layout weights widened to float32 exactly: d * q (+ m), as the GGUF file defines it.
void dequantize_row(const uint8_t* w, int fmt, int64_t k, int64_t row, float* out);
// Single-threaded whole product (tests and tools); returns -1 on a bad format or k % 32 != 0.
EDGELLM_EXPORT int edgellm_block_matmul(const float* x, int64_t m, int64_t k, const uint8_t* w, int fmt,
                                        int64_t n, float* y);
EDGELLM_EXPORT int edgellm_dequantize_rows(const uint8_t* w, int fmt, int64_t k, int64_t rows, float* out);
EDGELLM_EXPORT const char* edgellm_kernel_isa();
