// y = x @ W^T straight from GGUF blocks (Q4_0, Q4_1, Q8_0; 32 weights per block), with activations
// quantized to int8 per block of 32 in the manner of llama.cpp's CPU backend (d = amax / 127,
// q = round-half-even(x / d), s = d * sum(q); llama.cpp keeps d and s in fp16, here they stay fp32), so
// the weights stay exactly the file's and no ONNX node has to add Q4_1's per-block minimum afterwards
// (ONNX Runtime's MatMulNBits cannot do that on its fast path).
//
// Weight layout "x8" (written by edgellm.export.block_formats.interleave_x8): output rows in groups of
// 8 (the last group zero-padded), and per group and block of 32 inputs the 8 rows' fields side by side:
//   Q4_0: d[8] f16 | qs[8][16]            w = d * (q - 8)     (q: element j low nibble, j + 16 high)
//   Q4_1: d[8] f16 | m[8] f16 | qs[8][16] w = d * q + m
//   Q8_0: d[8] f16 | qs[8][32] int8       w = d * q
// so one load converts 8 scales, and two rows' nibbles sit in one 256-bit register.
// Per block:  sum_i w_i x_i  ~=  d * dx * dot(q, qx)  (+ m * sx; Q4_0: m = -8 d)
// Activation codes stay in [-127, 127] (never -128): what keeps maddubs below saturation and lets
// sign(x, w) negate them on the AVX2 path.
//
// The ISA paths (AVX-512 VNNI on 256-bit registers, AVX2, Arm NEON with or without dotprod, plain C)
// compute the same integer dot products; the SIMD paths also the same float operations in the same
// order (bit-identical results), the plain C path rounds its products differently. Built at first use
// with -march=native.
#include "block_matmul.h"

#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define EDGELLM_X86 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define EDGELLM_NEON 1
#endif

namespace {

inline float f16_to_f32(uint16_t h) {
#ifdef EDGELLM_X86
    return _cvtsh_ss(h);
#else
    const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float v;
    if (exp == 0) v = std::ldexp((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp((float)(man | 0x400), (int)exp - 25);
    return (h & 0x8000) ? -v : v;
#endif
}

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// Byte offsets inside one group-block of the x8 layout.
inline int scale_bytes(int fmt) { return fmt == FMT_Q4_1 ? 32 : 16; }
inline int row_code_bytes(int fmt) { return fmt == FMT_Q8_0 ? 32 : 16; }

#ifdef EDGELLM_X86
inline __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    // maddubs saturates at 16 bits: fine for nibbles (15 * 127 * 2) and |q8| (128 * 127 * 2).
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// 8 rows x R activation rows of Q4 blocks. t[p] holds rows 2p (low 128 bits) and 2p + 1 (high); three
// hadd levels leave row sums in lane order 0 2 4 6 1 3 5 7, undone once per group at the end.
template <int R>
void group_q4(const QuantizedRows& a, const uint8_t* g, int fmt, int64_t r0, float* out, int64_t ldo) {
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i unperm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int gbytes = 8 * block_bytes(fmt);
    __m256 acc[R], macc[R];
    for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.blocks; ++b) {
        const uint8_t* blk = g + b * gbytes;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
        const __m256 m8 = fmt == FMT_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16)))
                                          : _mm256_mul_ps(d8, _mm256_set1_ps(-8.f));
        const __m256 dp = _mm256_permutevar8x32_ps(d8, perm);
        const uint8_t* qs = blk + scale_bytes(fmt);
        __m256i lo[4], hi[4];
        for (int p = 0; p < 4; ++p) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * p));
            lo[p] = _mm256_and_si256(v, low4);
            hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        for (int r = 0; r < R; ++r) {
            const int8_t* xb = a.q + (r0 + r) * a.k + b * 32;
            const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)xb));
            const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(xb + 16)));
            __m256i t[4];
            for (int p = 0; p < 4; ++p)
                t[p] = dot_u8_s8(dot_u8_s8(_mm256_setzero_si256(), lo[p], xl), hi[p], xh);
            const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
            const float dx = a.d[(r0 + r) * a.blocks + b], sx = a.s[(r0 + r) * a.blocks + b];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dp, _mm256_set1_ps(dx)), acc[r]);
            macc[r] = _mm256_fmadd_ps(m8, _mm256_set1_ps(sx), macc[r]);
        }
    }
    for (int r = 0; r < R; ++r)
        _mm256_storeu_ps(out + r * ldo, _mm256_add_ps(_mm256_permutevar8x32_ps(acc[r], unperm), macc[r]));
}

// Q8_0: 8 rows of signed codes; u8 x s8 products via |w| and sign(x, w).
template <int R>
void group_q8(const QuantizedRows& a, const uint8_t* g, int64_t r0, float* out, int64_t ldo) {
    const int gbytes = 8 * block_bytes(FMT_Q8_0);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.blocks; ++b) {
        const uint8_t* blk = g + b * gbytes;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
        __m256i w[8], aw[8];
        for (int c = 0; c < 8; ++c) {
            w[c] = _mm256_loadu_si256((const __m256i*)(blk + 16 + 32 * c));
            aw[c] = _mm256_abs_epi8(w[c]);
        }
        for (int r = 0; r < R; ++r) {
            const __m256i x = _mm256_loadu_si256((const __m256i*)(a.q + (r0 + r) * a.k + b * 32));
            __m256i t[8];
            for (int c = 0; c < 8; ++c) t[c] = dot_u8_s8(_mm256_setzero_si256(), aw[c], _mm256_sign_epi8(x, w[c]));
            // rows 0-3 and 4-7, each 128-bit half holding half of every row's lanes
            const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
            const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(t[4], t[5]), _mm256_hadd_epi32(t[6], t[7]));
            const __m256i s = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),
                                               _mm256_permute2x128_si256(g0, g1, 0x31));
            const float dx = a.d[(r0 + r) * a.blocks + b];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d8, _mm256_set1_ps(dx)), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo, acc[r]);
}
#endif

#ifdef EDGELLM_NEON
// Arm (Raspberry Pi, Jetson): one activation row at a time; each row of the group's integer dot product
// with vdotq_s32 where the CPU has it (ARMv8.2 dotprod), else widening multiplies, then the same float
// accumulation as the other paths, 8 rows as two float32x4.
inline int32_t dot32(int8x16_t w0, int8x16_t x0, int8x16_t w1, int8x16_t x1) {
#ifdef __ARM_FEATURE_DOTPROD
    return vaddvq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1));
#else
    // |w x| <= 128 * 127: two products per int16 lane stay below 32767 (activation codes are never -128)
    int32x4_t acc = vpaddlq_s16(vmlal_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), vget_high_s8(w0), vget_high_s8(x0)));
    acc = vpadalq_s16(acc, vmlal_s8(vmull_s8(vget_low_s8(w1), vget_low_s8(x1)), vget_high_s8(w1), vget_high_s8(x1)));
    return vaddvq_s32(acc);
#endif
}

inline float32x4_t f16x4(const uint8_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t*)p))); }

void group_neon(const QuantizedRows& a, const uint8_t* g, int fmt, int64_t row, float* out) {
    const int gbytes = 8 * block_bytes(fmt);
    float32x4_t acc[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}, macc[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    for (int64_t b = 0; b < a.blocks; ++b) {
        const uint8_t* blk = g + b * gbytes;
        const int8_t* xb = a.q + row * a.k + b * 32;
        const int8x16_t xl = vld1q_s8(xb), xh = vld1q_s8(xb + 16);
        const uint8_t* codes = blk + scale_bytes(fmt);
        int32_t dots[8];
        for (int c = 0; c < 8; ++c) {
            if (fmt == FMT_Q8_0) {
                const int8_t* w = (const int8_t*)codes + 32 * c;
                dots[c] = dot32(vld1q_s8(w), xl, vld1q_s8(w + 16), xh);
            } else {
                const uint8x16_t v = vld1q_u8(codes + 16 * c);
                dots[c] = dot32(vreinterpretq_s8_u8(vandq_u8(v, low4)), xl, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), xh);
            }
        }
        const float dx = a.d[row * a.blocks + b], sx = a.s[row * a.blocks + b];
        for (int h = 0; h < 2; ++h) {
            const float32x4_t d4 = f16x4(blk + 8 * h);
            const float32x4_t dot = vcvtq_f32_s32(vld1q_s32(dots + 4 * h));
            acc[h] = vfmaq_f32(acc[h], dot, vmulq_n_f32(d4, dx));
            if (fmt == FMT_Q4_1) macc[h] = vfmaq_n_f32(macc[h], f16x4(blk + 16 + 8 * h), sx);
            else if (fmt == FMT_Q4_0) macc[h] = vfmaq_n_f32(macc[h], vmulq_n_f32(d4, -8.f), sx);
        }
    }
    for (int h = 0; h < 2; ++h) vst1q_f32(out + 4 * h, vaddq_f32(acc[h], macc[h]));
}
#endif

// Plain C: the same arithmetic, one row of the group at a time.
[[maybe_unused]] void group_scalar(const QuantizedRows& a, const uint8_t* g, int fmt, int64_t r0, int rows, float* out,
                  int64_t ldo) {
    const int gbytes = 8 * block_bytes(fmt);
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < 8; ++c) {
            float acc = 0.f, macc = 0.f;
            for (int64_t b = 0; b < a.blocks; ++b) {
                const uint8_t* blk = g + b * gbytes;
                const float d = f16_to_f32(load_u16(blk + 2 * c));
                const uint8_t* code = blk + scale_bytes(fmt) + row_code_bytes(fmt) * c;
                const int8_t* xb = a.q + (r0 + r) * a.k + b * 32;
                int32_t dot = 0;
                for (int i = 0; i < 32; ++i) {
                    const int w = fmt == FMT_Q8_0 ? (int)(int8_t)code[i]
                                                  : (i < 16 ? code[i] & 0x0F : code[i - 16] >> 4);
                    dot += w * xb[i];
                }
                const float m = fmt == FMT_Q4_1 ? f16_to_f32(load_u16(blk + 16 + 2 * c)) : fmt == FMT_Q4_0 ? -8.f * d : 0.f;
                acc += (float)dot * d * a.d[(r0 + r) * a.blocks + b];
                macc += m * a.s[(r0 + r) * a.blocks + b];
            }
            out[r * ldo + c] = acc + macc;
        }
    }
}

// Rows r0 .. r0 + rows of one 8-row group into out (row stride ldo), 4 activation rows at a time.
void group(const QuantizedRows& a, const uint8_t* g, int fmt, int64_t r0, int rows, float* out, int64_t ldo) {
#ifdef EDGELLM_X86
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        if (fmt == FMT_Q8_0) group_q8<4>(a, g, r0 + r, out + r * ldo, ldo);
        else group_q4<4>(a, g, fmt, r0 + r, out + r * ldo, ldo);
    }
    for (; r < rows; ++r) {
        if (fmt == FMT_Q8_0) group_q8<1>(a, g, r0 + r, out + r * ldo, ldo);
        else group_q4<1>(a, g, fmt, r0 + r, out + r * ldo, ldo);
    }
#elif defined(EDGELLM_NEON)
    for (int r = 0; r < rows; ++r) group_neon(a, g, fmt, r0 + r, out + r * ldo);
#else
    group_scalar(a, g, fmt, r0, rows, out, ldo);
#endif
}

}  // namespace

int block_bytes(int fmt) {
    switch (fmt) {
        case FMT_Q4_0: return 18;
        case FMT_Q4_1: return 20;
        case FMT_Q8_0: return 34;
        default: return 0;
    }
}

void dequantize_row(const uint8_t* w, int fmt, int64_t k, int64_t row, float* out) {
    const int64_t nb = k / 32;
    const int gbytes = 8 * block_bytes(fmt);
    const uint8_t* g = w + (row / 8) * nb * gbytes;
    const int c = (int)(row % 8);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = g + b * gbytes;
        const float d = f16_to_f32(load_u16(blk + 2 * c));
        const uint8_t* code = blk + scale_bytes(fmt) + row_code_bytes(fmt) * c;
        if (fmt == FMT_Q8_0) {
            for (int i = 0; i < 32; ++i) out[b * 32 + i] = d * (float)(int8_t)code[i];
            continue;
        }
        const float m = fmt == FMT_Q4_1 ? f16_to_f32(load_u16(blk + 16 + 2 * c)) : 0.f;
        for (int i = 0; i < 32; ++i) {
            const int q = i < 16 ? (code[i] & 0x0F) : (code[i - 16] >> 4);
            out[b * 32 + i] = fmt == FMT_Q4_1 ? d * (float)q + m : d * (float)(q - 8);
        }
    }
}

void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* d, float* s) {
    const int64_t nb = k / 32;
    for (int64_t row = 0; row < m; ++row) {
        for (int64_t b = 0; b < nb; ++b) {
            const float* xb = x + row * k + b * 32;
            int8_t* qb = q + row * k + b * 32;
            float amax = 0.f;
            for (int i = 0; i < 32; ++i) {
                const float a = std::fabs(xb[i]);
                if (!(a <= amax)) amax = a;  // a NaN wins: the block's scale becomes NaN and so does y
            }
            // a block below ~1e-30 (where 1/scale would overflow) counts as zero
            const float scale = amax > 1e-30f || amax != amax ? amax / 127.f : 0.f;
            const float inv = scale > 0.f ? 1.f / scale : 0.f;
            int32_t sum = 0;
            for (int i = 0; i < 32; ++i) {
                const int v = (int)std::nearbyint(xb[i] * inv);  // round half to even
                qb[i] = (int8_t)v;
                sum += v;
            }
            d[row * nb + b] = scale;
            s[row * nb + b] = scale * (float)sum;
        }
    }
}

void matmul_groups(const QuantizedRows* a, const uint8_t* w, int fmt, int64_t n, int64_t g_begin, int64_t g_end,
                   float* y) {
    const int64_t group_bytes = a->blocks * 8 * block_bytes(fmt);
    float tail[4 * 8];
    for (int64_t g = g_begin; g < g_end; ++g) {
        const uint8_t* gw = w + g * group_bytes;
        const int64_t col = g * 8;
        if (col + 8 <= n) {
            for (int64_t r = 0; r < a->m; r += 4) {
                const int rows = a->m - r < 4 ? (int)(a->m - r) : 4;
                group(*a, gw, fmt, r, rows, y + r * n + col, n);
            }
        } else {  // zero-padded last group: compute 8, keep the real ones
            for (int64_t r = 0; r < a->m; r += 4) {
                const int rows = a->m - r < 4 ? (int)(a->m - r) : 4;
                group(*a, gw, fmt, r, rows, tail, 8);
                for (int i = 0; i < rows; ++i)
                    for (int64_t c = col; c < n; ++c) y[(r + i) * n + c] = tail[i * 8 + (c - col)];
            }
        }
    }
}

int edgellm_block_matmul(const float* x, int64_t m, int64_t k, const uint8_t* w, int fmt, int64_t n, float* y) {
    if (k <= 0 || k % 32 || block_bytes(fmt) == 0) return -1;
    QuantizedRows a;
    a.m = m;
    a.k = k;
    a.blocks = k / 32;
    int8_t* q = new int8_t[m * k];
    float* d = new float[m * a.blocks];
    float* s = new float[m * a.blocks];
    quantize_rows(x, m, k, q, d, s);
    a.q = q;
    a.d = d;
    a.s = s;
    matmul_groups(&a, w, fmt, n, 0, (n + 7) / 8, y);
    delete[] q;
    delete[] d;
    delete[] s;
    return 0;
}

int edgellm_dequantize_rows(const uint8_t* w, int fmt, int64_t k, int64_t rows, float* out) {
    if (k <= 0 || k % 32 || block_bytes(fmt) == 0) return -1;
    for (int64_t r = 0; r < rows; ++r) dequantize_row(w, fmt, k, r, out + r * k);
    return 0;
}

const char* edgellm_kernel_isa() {
#if defined(EDGELLM_X86) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx512-vnni";
#elif defined(EDGELLM_X86)
    return "avx2";
#elif defined(EDGELLM_NEON) && defined(__ARM_FEATURE_DOTPROD)
    return "neon-dotprod";
#elif defined(EDGELLM_NEON)
    return "neon";
#else
    return "scalar";
#endif
}
