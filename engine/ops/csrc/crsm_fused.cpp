// Fused CPU kernels for the Mamba engine (float32), called through ctypes.
//
// No torch headers: the file builds with a plain `g++ -O3 -march=native
// -fopenmp -shared` in about a second (including <torch/extension.h> costs
// tens of seconds on a 2-core machine). Tensors arrive as raw pointers plus
// the strides the Python side has checked. OpenMP resolves to the libgomp
// torch has already loaded (same soname), so torch and these kernels share
// one thread pool instead of fighting over the cores.
//
// Three entry points:
//   crsm_linear: y = x W^T (+ bias) for a few rows (decode) with float32,
//     int8 (per-row scales) or bfloat16 weights, activations and sums in
//     float32: the low-precision weight is widened in registers, so a step
//     reads 1 or 2 bytes per weight instead of 4.
//   crsm_selective_scan: prefill's scan, fused with the D skip and the
//     silu(z) gate; channels in parallel, 16 channels per SIMD vector, time
//     sequential (one pass over L, nothing materialised per step).
//   crsm_decode_layers: one decode step through every layer (residual add,
//     norm, in_proj, conv update, x_proj, dt_proj + softplus, state update,
//     gate, out_proj) and the final norm, inside one OpenMP region: what
//     eager PyTorch does in ~25 ops per layer, each paying dispatch cost;
//     the projections in any of the weight kinds above.
//   crsm_ssd_step: Mamba-2's decode-step state update, y = (decay * h +
//     dt x B^T) C + D x, in one read and one write of the state per head
//     (eager PyTorch makes about seven passes over it; at batch 32 of the
//     130M shape the state is 627 MB, so those passes are the step's cost).

#include <omp.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxState = 64;  // d_state bound for the on-stack state block
constexpr int kLanes = 16;     // channels per block: one AVX-512 vector of floats
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (clamped below at -126), Cephes' exp2f polynomial on
// [-0.5, 0.5]: relative error ~2e-7; branch-free so loops over it vectorise.
inline float exp2_fast(float x) {
  x = x < -126.f ? -126.f : (x > 126.f ? 126.f : x);
  const float xi = std::floor(x + 0.5f);
  const float f = x - xi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(xi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float silu(float v) { return v / (1.0f + exp2_fast(-v * kLog2e)); }

// The same exp2 and silu on 16 lanes with GCC vector extensions: gcc did not
// vectorise the scalar version inside the scan's lane loop (it ran scalar,
// ~5 ns per state element), so the scan's 16-channel block is written with
// explicit vectors.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

// 2^f for f in [-0.5, 0.5]: exp2_fast's polynomial on 16 lanes.
inline vf16 exp2_poly(vf16 f) {
  vf16 p = vf16{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}

inline vf16 exp2_vec(vf16 x) {
#if defined(__AVX512F__)
  // The same polynomial with AVX-512's min/max, roundscale and scalef (p * 2^xi
  // in one instruction): 11 instructions instead of ~18 for the blends, the
  // magic-number rounding and the exponent built in integer lanes. Same
  // results: round to nearest even, exact power-of-two scaling.
  const __m512 xc = _mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-126.f)), _mm512_set1_ps(126.f));
  const __m512 xr = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (vf16)_mm512_scalef_ps((__m512)exp2_poly((vf16)_mm512_sub_ps(xc, xr)), xr);
#else
  const vf16 lo = vf16{} - 126.f, hi = vf16{} + 126.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf16 magic = vf16{} + 12582912.f;  // 1.5 * 2^23: (x + magic) - magic rounds to nearest
  const vf16 xi = (x + magic) - magic;
  const vi16 bits = (__builtin_convertvector(xi, vi16) + 127) << 23;
  return exp2_poly(x - xi) * (vf16)bits;  // a vector cast reinterprets the bits
#endif
}

// 1 / d on 16 lanes: AVX-512's 14-bit estimate and one Newton step (rel.
// error ~2^-28 before float rounding); a vector division is several times
// slower and was a quarter of the prefill scan's time (softplus and silu).
inline vf16 rcp_vec(vf16 d) {
#if defined(__AVX512F__)
  const vf16 r = (vf16)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

inline vf16 silu_vec(vf16 v) { return v * rcp_vec(1.0f + exp2_vec(-v * kLog2e)); }

// log1p(e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) <= 1/3: the odd
// series to s^13 leaves < 1e-8. For float and for 16-lane vectors.
inline float reciprocal(float d) { return 1.0f / d; }
inline vf16 reciprocal(vf16 d) { return rcp_vec(d); }

template <typename T>
inline T log1p_unit(T e) {
  const T s = e * reciprocal(2.0f + e), s2 = s * s;
  T p = T{} + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)) on 16 lanes (the scalar one is below).
inline vf16 softplus_vec(vf16 v) {
  const vf16 zero = vf16{};
  const vf16 a = v < zero ? -v : v;
  return (v > zero ? v : zero) + log1p_unit(exp2_vec(-a * kLog2e));
}

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

// softplus(v) = max(v, 0) + log1p(exp(-|v|)) with exp2_fast and
// log1p_unit: ~4x cheaper than libm's log1pf(expf(v)), which was ~20% of a
// default-shape decode step on one thread.
inline float softplus(float v) { return (v > 0.f ? v : 0.f) + log1p_unit(exp2_fast(-std::fabs(v) * kLog2e)); }

// --- Prefill scan -----------------------------------------------------------

struct ScanArgs {
  const float *x, *dt, *z, *B, *C, *A2, *Dskip;
  float *h, *out;
  int64_t L, D, N;
  int64_t sx_b, sx_t, sdt_b, sdt_t, sz_b, sz_t, sbc_b, sbc_t;  // strides (elements) of batch and time
  int dt_softplus;         // dt arrives before its softplus (prefill: one pass instead of two)
  const int64_t* lengths;  // per row; steps at or past a row's length get dt = 0 (padding), or null
};

// Channels [d0, d0 + W) of batch row bi over all L steps.
template <int W>
void scan_block(const ScanArgs& a, int64_t bi, int64_t d0) {
  const int64_t N = a.N, D = a.D;
  float hl[kMaxState * W], al[kMaxState * W], dsk[W];
  float* hrow = a.h + bi * D * N;
  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < W; ++j) {
      hl[n * W + j] = hrow[(d0 + j) * N + n];
      al[n * W + j] = a.A2[(d0 + j) * N + n];
    }
  for (int j = 0; j < W; ++j) dsk[j] = a.Dskip[d0 + j];
  const float* xb = a.x + bi * a.sx_b + d0;
  const float* dtb = a.dt + bi * a.sdt_b + d0;
  const float* zb = a.z + bi * a.sz_b + d0;
  const float* Bb = a.B + bi * a.sbc_b;
  const float* Cb = a.C + bi * a.sbc_b;
  float* ob = a.out + bi * a.L * D + d0;
  const int64_t len = a.lengths ? a.lengths[bi] : a.L;
  for (int64_t t = 0; t < a.L; ++t) {
    const float *xt = xb + t * a.sx_t, *dtt = dtb + t * a.sdt_t, *zt = zb + t * a.sz_t;
    const float *Bt = Bb + t * a.sbc_t, *Ct = Cb + t * a.sbc_t;
    float dtv[W], dtx[W], y[W];
    for (int j = 0; j < W; ++j) {
      dtv[j] = t >= len ? 0.f : (a.dt_softplus ? softplus(dtt[j]) : dtt[j]);
      dtx[j] = dtv[j] * xt[j];
      y[j] = 0.f;
    }
    for (int64_t n = 0; n < N; ++n) {
      const float bn = Bt[n], cn = Ct[n];
      float* hn = hl + n * W;
      const float* an = al + n * W;
#pragma omp simd
      for (int j = 0; j < W; ++j) {
        const float hv = exp2_fast(dtv[j] * an[j]) * hn[j] + dtx[j] * bn;
        hn[j] = hv;
        y[j] += cn * hv;
      }
    }
    float* ot = ob + t * D;
#pragma omp simd
    for (int j = 0; j < W; ++j) ot[j] = (y[j] + dsk[j] * xt[j]) * silu(zt[j]);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < W; ++j) hrow[(d0 + j) * N + n] = hl[n * W + j];
}

// Channels [d0, d0 + 16) of batch row bi: scan_block<16> with explicit vectors.
void scan_block16(const ScanArgs& a, int64_t bi, int64_t d0) {
  const int64_t N = a.N, D = a.D;
  vf16 hl[kMaxState], al[kMaxState];
  float* hrow = a.h + bi * D * N;
  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < kLanes; ++j) {
      hl[n][j] = hrow[(d0 + j) * N + n];
      al[n][j] = a.A2[(d0 + j) * N + n];
    }
  const vf16 dsk = load16(a.Dskip + d0);
  const float* xb = a.x + bi * a.sx_b + d0;
  const float* dtb = a.dt + bi * a.sdt_b + d0;
  const float* zb = a.z + bi * a.sz_b + d0;
  const float* Bb = a.B + bi * a.sbc_b;
  const float* Cb = a.C + bi * a.sbc_b;
  float* ob = a.out + bi * a.L * D + d0;
  const int64_t len = a.lengths ? a.lengths[bi] : a.L;
  // Time in tiles: dt (its softplus, the padding) and the silu(z) gate are
  // computed for a tile first, so the recurrence's loop stays small (inline,
  // they made it slower: 130M prefill layer, interleaved, 11.4 -> 9.3 ms).
  constexpr int64_t kTile = 64;
  vf16 dts[kTile], gates[kTile];
  for (int64_t t0 = 0; t0 < a.L; t0 += kTile) {
    const int64_t t1 = t0 + kTile < a.L ? t0 + kTile : a.L;
    for (int64_t t = t0; t < t1; ++t) {
      const vf16 raw = load16(dtb + t * a.sdt_t);
      dts[t - t0] = t >= len ? vf16{} : (a.dt_softplus ? softplus_vec(raw) : raw);
      gates[t - t0] = silu_vec(load16(zb + t * a.sz_t));
    }
    for (int64_t t = t0; t < t1; ++t) {
      const vf16 dtv = dts[t - t0], xv = load16(xb + t * a.sx_t), dtx = dtv * xv;
      const float *Bt = Bb + t * a.sbc_t, *Ct = Cb + t * a.sbc_t;
      vf16 y[4] = {};  // four partial sums: one chain of N dependent adds was the step's critical path
      for (int64_t n = 0; n < N; ++n) {
        const vf16 hv = exp2_vec(dtv * al[n]) * hl[n] + dtx * Bt[n];
        hl[n] = hv;
        y[n & 3] += Ct[n] * hv;
      }
      store16(ob + t * D, ((y[0] + y[1]) + (y[2] + y[3]) + dsk * xv) * gates[t - t0]);
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < kLanes; ++j) hrow[(d0 + j) * N + n] = hl[n][j];
}

// --- Prefill causal conv ----------------------------------------------------

constexpr int kMaxConv = 8;  // d_conv bound for the register window

// silu(causal depthwise conv) for channels [d0, d0 + 16) of row bi: the
// window of the last K - 1 inputs stays in registers, one pass over L
// (eager: a copy into a (K + L) window, K multiply-adds, a bias add and a
// silu, each a pass over b x L x D).
void conv_block16(const float* x, int64_t sx_b, int64_t sx_t, const float* state, const float* w, const float* bias,
                  float* out, int64_t bi, int64_t d0, int64_t L, int64_t D, int64_t K) {
  vf16 win[kMaxConv], wk[kMaxConv];
  for (int64_t k = 0; k < K; ++k)
    for (int j = 0; j < kLanes; ++j) {
      wk[k][j] = w[(d0 + j) * K + k];
      win[k][j] = state ? state[(bi * D + d0 + j) * K + k] : 0.f;  // win[K - 1] is overwritten by x[t]
    }
  const vf16 bv = bias ? load16(bias + d0) : vf16{};
  const float* xb = x + bi * sx_b + d0;
  float* ob = out + bi * L * D + d0;
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t k = 0; k + 1 < K; ++k) win[k] = win[k + 1];
    win[K - 1] = load16(xb + t * sx_t);
    vf16 acc = bv;
    for (int64_t k = 0; k < K; ++k) acc += wk[k] * win[k];
    store16(ob + t * D, silu_vec(acc));
  }
}

void conv_channel(const float* x, int64_t sx_b, int64_t sx_t, const float* state, const float* w, const float* bias,
                  float* out, int64_t bi, int64_t d, int64_t L, int64_t D, int64_t K) {
  float win[kMaxConv];
  for (int64_t k = 0; k < K; ++k) win[k] = state ? state[(bi * D + d) * K + k] : 0.f;
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t k = 0; k + 1 < K; ++k) win[k] = win[k + 1];
    win[K - 1] = x[bi * sx_b + t * sx_t + d];
    float acc = bias ? bias[d] : 0.f;
    for (int64_t k = 0; k < K; ++k) acc += w[d * K + k] * win[k];
    out[(bi * L + t) * D + d] = silu(acc);
  }
}

// --- Decode step ---------------------------------------------------------------

// Per-layer weights, in the order the Python side packs them.
// Projection weights (kInW, kXpW, kDtW, kOutW) are in the step's weight kind;
// kInS.. kOutS are their per-row scales (int8) or null.
enum : int {
  kNormW, kNormB, kInW, kInB, kConvW, kConvB, kXpW, kDtW, kDtB, kA2, kDskip, kOutW, kOutB,
  kInS, kXpS, kDtS, kOutS, kPerLayer
};

struct Dims {
  int64_t b, Dm, Di, N, R, K;
};

// Weight kinds of the projections (engine/quant.py): float32, int8 with one
// float32 scale per output row (w = q * scale), or bfloat16 (the top half of
// a float32).
enum WeightKind : int { kF32 = 0, kI8 = 1, kBF16 = 2 };

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 16 weights widened to float32 lanes. Intrinsics where the CPU has them:
// gcc 12 scalarises __builtin_convertvector from int8/uint16 vectors (the
// auto-vectorised widening loop ran at a third of float32's speed).
inline vf16 load_w16(const float* p) { return load16(p); }
inline vf16 load_w16(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  vf16 out;
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  vf16 out;
  for (int j = 0; j < kLanes; ++j) out[j] = static_cast<float>(p[j]);
  return out;
#endif
}
inline vf16 load_w16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf16)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#elif defined(__AVX2__)
  vf16 out;
  const __m256 lo = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  const __m256 hi = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16));
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
#else
  vf16 out;
  for (int j = 0; j < kLanes; ++j) out[j] = widen(p[j]);
  return out;
#endif
}

// Rows are read four at a time: four short interleaved streams (an int8 row
// of 768 is 12 cache lines) that the hardware prefetcher follows poorly. So
// while a block of four rows is read, the next block (contiguous after it) is
// prefetched in memory order, as much of it per step as the step consumes
// (`count` elements from element `offset`). Measured on the 2-core EPYC VM, a
// 50280 x 768 int8 GEMV on one thread: 4.95 ms without, 2.97 ms prefetching
// the same line of each next row, 1.48 ms in memory order.
template <typename T>
inline void prefetch_next(const T* next, int64_t offset, int64_t count) {
  const char* p = reinterpret_cast<const char*>(next + offset);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 3);
}

inline float hsum(vf16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);  // a tree: the scalar loop was 15 dependent adds per output
#else
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
#endif
}

// out[j] = the sum of v[j]'s lanes for 16 vectors at once: a transposing
// tree of 15 vector adds (shuffles between) instead of 16 separate
// horizontal sums of ~9 instructions each.
inline vf16 hsum16x16(const vf16* v) {
#if defined(__AVX512F__)
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i) {  // 128-bit lanes 0-1: v[2i]'s halves summed, 2-3: v[2i+1]'s
    const __m512 a = (__m512)v[2 * i], b = (__m512)v[2 * i + 1];
    s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // lane k: four partials of v[4i + k]
    s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane k: two partials each of v[8i + k], v[8i + 4 + k]
    s3[i] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0x44),
                          _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0xEE));
  // element 4k + m now holds v[4m + k]'s sum; the permutation puts v[j]'s at j
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return (vf16)_mm512_permutexvar_ps(idx, t);
#else
  vf16 out;
  for (int j = 0; j < kLanes; ++j) out[j] = hsum(v[j]);
  return out;
#endif
}

// Four weight rows against four batch rows: 16 independent vector
// accumulators; each widened weight vector serves four batch rows.
template <typename WT>
inline void dot_4x4(const WT* w0, const float* x0, int64_t K, float* acc) {
  const WT* w[4] = {w0, w0 + K, w0 + 2 * K, w0 + 3 * K};
  const float* x[4] = {x0, x0 + K, x0 + 2 * K, x0 + 3 * K};
  vf16 a[4][4] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    prefetch_next(w0 + 4 * K, 4 * k, 4 * kLanes);
    const vf16 u0 = load_w16(w[0] + k), u1 = load_w16(w[1] + k), u2 = load_w16(w[2] + k), u3 = load_w16(w[3] + k);
    for (int i = 0; i < 4; ++i) {
      const vf16 v = load16(x[i] + k);
      a[i][0] += u0 * v, a[i][1] += u1 * v, a[i][2] += u2 * v, a[i][3] += u3 * v;
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      float t = hsum(a[i][j]);
      for (int64_t kk = k; kk < K; ++kk) t += widen(w[j][kk]) * x[i][kk];
      acc[i * 4 + j] = t;
    }
}

// Four weight rows against one batch row, two vectors of K per iteration:
// eight independent accumulators cover the FMA latency.
template <typename WT>
inline void dot_4x1(const WT* w0, const float* xr, int64_t K, float* acc) {
  const WT* w[4] = {w0, w0 + K, w0 + 2 * K, w0 + 3 * K};
  vf16 a[4] = {}, c[4] = {};
  int64_t k = 0;
  for (; k + 2 * kLanes <= K; k += 2 * kLanes) {
    const vf16 v = load16(xr + k), v2 = load16(xr + k + kLanes);
    prefetch_next(w0 + 4 * K, 4 * k, 8 * kLanes);
    for (int j = 0; j < 4; ++j) {
      a[j] += load_w16(w[j] + k) * v;
      c[j] += load_w16(w[j] + k + kLanes) * v2;
    }
  }
  for (; k + kLanes <= K; k += kLanes) {
    const vf16 v = load16(xr + k);
    for (int j = 0; j < 4; ++j) a[j] += load_w16(w[j] + k) * v;
  }
  for (int j = 0; j < 4; ++j) {
    float t = hsum(a[j] + c[j]);
    for (int64_t kk = k; kk < K; ++kk) t += widen(w[j][kk]) * xr[kk];
    acc[j] = t;
  }
}

template <typename WT>
inline float dot_1x1(const WT* w, const float* xr, int64_t K) {
  vf16 a = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) a += load_w16(w + k) * load16(xr + k);
  float t = hsum(a);
  for (; k < K; ++k) t += widen(w[k]) * xr[k];
  return t;
}

// --- int8 weights against int16 activations (AVX512-VNNI) -----------------------
//
// Widening int8 weights to float costs two instructions per 16 weights, and
// the core then streams memory at a third of float32's rate. VNNI's vpdpwssd
// multiplies 32 int16 pairs into int32 sums in one instruction: the
// activation row is quantized per block of 64 to int16 (scale max|x| / 32767:
// 2^-16 of the block's largest value, far below the weights' int8 rounding;
// int8 activations, as llama.cpp's Q8_0 path uses, cost the default model a
// fifth of its greedy agreement with float32), the weights are sign-extended
// to int16 on the fly, and each block's int32 sum is scaled into a float
// accumulator. A K tail under 64 runs in float.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define CRSM_INT8_VNNI 1
constexpr int64_t kQBlock = 64;

struct QuantRows {  // activations of b rows, quantized per block of kQBlock
  std::vector<int16_t> q;
  std::vector<float> scale;
  int64_t blocks = 0;
};

void quantize_rows(const float* X, int64_t b, int64_t K, QuantRows& out) {
  const int64_t nb = K / kQBlock;
  out.blocks = nb;
  out.q.resize(b * nb * kQBlock);
  out.scale.resize(b * nb);
  for (int64_t r = 0; r < b; ++r)
    for (int64_t c = 0; c < nb; ++c) {
      const float* x = X + r * K + c * kQBlock;
      int16_t* q = out.q.data() + (r * nb + c) * kQBlock;
      vf16 m = vf16{};
      for (int64_t k = 0; k < kQBlock; k += kLanes) {
        const vf16 v = load16(x + k);
        m = m > v ? m : v;
        m = m > -v ? m : -v;
      }
      float amax = 0.f;
      for (int j = 0; j < kLanes; ++j) amax = amax > m[j] ? amax : m[j];
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int64_t k = 0; k < kQBlock; k += kLanes) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps((__m512)load16(x + k), _mm512_set1_ps(inv)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm512_cvtsepi32_epi16(v));  // round to nearest
      }
      out.scale[r * nb + c] = amax / 32767.f;
    }
}

// NW (<= 4) weight rows against NR (<= 4) quantized activation rows from r0:
// acc[i * 4 + j] = sum_k w[j][k] x[r0 + i][k] (before the weight scale). Each
// block's weights are sign-extended once and serve all NR rows.
template <int NW, int NR>
inline void dot_q8(const int8_t* w0, int64_t K, const QuantRows& qx, int64_t r0, const float* X, float* acc) {
  __m512 f[NR][NW];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NW; ++j) f[i][j] = _mm512_setzero_ps();
  const int64_t nb = qx.blocks;
  for (int64_t c = 0; c < nb; ++c) {
    prefetch_next(w0 + NW * K, c * NW * kQBlock, NW * kQBlock);
    __m512i w_lo[NW], w_hi[NW];
    for (int j = 0; j < NW; ++j) {
      const int8_t* wj = w0 + j * K + c * kQBlock;
      w_lo[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj)));
      w_hi[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + 32)));
    }
    for (int i = 0; i < NR; ++i) {
      const int16_t* q = qx.q.data() + ((r0 + i) * nb + c) * kQBlock;
      const __m512i x0 = _mm512_loadu_si512(q), x1 = _mm512_loadu_si512(q + 32);
      const __m512 sc = _mm512_set1_ps(qx.scale[(r0 + i) * nb + c]);
      for (int j = 0; j < NW; ++j) {
        const __m512i d = _mm512_dpwssd_epi32(_mm512_madd_epi16(w_lo[j], x0), w_hi[j], x1);
        f[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, f[i][j]);
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    const float* xr = X + (r0 + i) * K;
    for (int j = 0; j < NW; ++j) {
      float t = _mm512_reduce_add_ps(f[i][j]);
      for (int64_t k = nb * kQBlock; k < K; ++k) t += static_cast<float>(w0[j * K + k]) * xr[k];
      acc[i * 4 + j] = t;
    }
  }
}

template <int NW>
inline void dot_q8_rows(const int8_t* w0, int64_t K, const QuantRows& qx, int64_t b, const float* X, float* Y,
                        int64_t M, int64_t m0, const float* scale, const float* bias) {
  float acc[16];
  int64_t r = 0;
  auto put = [&](int64_t rows_x) {
    for (int64_t i = 0; i < rows_x; ++i)
      for (int j = 0; j < NW; ++j) {
        const float v = acc[i * 4 + j] * scale[m0 + j];
        Y[(r + i) * M + m0 + j] = bias ? v + bias[m0 + j] : v;
      }
  };
  for (; r + 4 <= b; r += 4) dot_q8<NW, 4>(w0, K, qx, r, X, acc), put(4);
  for (; r < b; ++r) dot_q8<NW, 1>(w0, K, qx, r, X, acc), put(1);
}

void linear_rows_q8(const int8_t* W, const float* scale, const float* bias, const float* X, float* Y, int64_t b,
                    int64_t M, int64_t K) {
  thread_local QuantRows qx;  // each thread quantizes the (few) rows itself: no barrier needed
  quantize_rows(X, b, K, qx);
#pragma omp for schedule(static) nowait
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    if (M - m0 >= 4) {
      dot_q8_rows<4>(W + m0 * K, K, qx, b, X, Y, M, m0, scale, bias);
    } else {
      for (int64_t m = m0; m < M; ++m) dot_q8_rows<1>(W + m * K, K, qx, b, X, Y, M, m, scale, bias);
    }
  }
}
#endif

// One projection's weight as the step sees it.
struct WeightRef {
  const void* data;
  const float* scale;  // per output row (int8 only), else null
  int kind;
};

// Y[r, m] = (W[m, :] . X[r, :]) * scale[m] + bias[m] for rows m of this
// thread's share (an `omp for` inside the caller's parallel region). Four
// weight rows at a time: independent accumulators hide FMA latency and each
// loaded row block is reused for every batch row while it sits in L1.
template <typename WT>
void linear_rows_t(const WT* W, const float* scale, const float* bias, const float* X, float* Y, int64_t b, int64_t M,
                   int64_t K) {
#pragma omp for schedule(static) nowait
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t rows = M - m0 < 4 ? M - m0 : 4;
    int64_t r = 0;
    float acc[16];
    if (rows == 4)
      for (; r + 4 <= b; r += 4) {
        dot_4x4(W + m0 * K, X + r * K, K, acc);
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t j = 0; j < 4; ++j) Y[(r + i) * M + m0 + j] = acc[i * 4 + j];
      }
    for (; r < b; ++r) {
      if (rows == 4) {
        dot_4x1(W + m0 * K, X + r * K, K, acc);
      } else {
        for (int64_t i = 0; i < rows; ++i) acc[i] = dot_1x1(W + (m0 + i) * K, X + r * K, K);
      }
      for (int64_t i = 0; i < rows; ++i) Y[r * M + m0 + i] = acc[i];
    }
    if (scale || bias)
      for (int64_t r2 = 0; r2 < b; ++r2)
        for (int64_t i = 0; i < rows; ++i) {
          float& v = Y[r2 * M + m0 + i];
          if (scale) v *= scale[m0 + i];
          if (bias) v += bias[m0 + i];
        }
  }
}

// --- float32 weights against a batch of rows: broadcast form ---------------------
//
// From ~6 rows the dot-product tiles above stop being the right shape: each
// output needs a horizontal sum and every FMA reloads an activation vector;
// on the 2-core EPYC VM they ran ~21 GMAC/s per core where an FMA-only loop
// runs ~58. Here the activations are transposed once per projection (xt:
// K x ld, rows b..ld-1 zero), each weight is broadcast against a vector of
// batch rows and the accumulators hold finished outputs, as a GEMM
// micro-kernel does: 3072 x 768 against 32 rows ran 38-42 GMAC/s per core
// (16 rows: 29, 8: 21, 5: 13 = the dot form's; weights from memory, one
// thread, transposition included). Summation runs along k in one accumulator
// per output instead of 16 lane partials: results differ in float rounding.
constexpr int64_t kBcastMinRows = 6;
constexpr int64_t kBcastMaxRows = 32;
typedef float vf8 __attribute__((vector_size(32)));

inline int64_t bcast_ld(int64_t b) { return b <= 8 ? 8 : (b <= 16 ? 16 : 32); }

template <typename V>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// xt[k * ld + r] = X[r * K + k] (zero for b <= r < ld), k split over the team;
// the `omp for`'s closing barrier publishes xt to every thread.
void transpose_rows(const float* X, int64_t b, int64_t K, float* xt, int64_t ld) {
#pragma omp for schedule(static)
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    const int64_t k1 = K - k0 < 64 ? K : k0 + 64;
    for (int64_t r = 0; r < ld; ++r)
      for (int64_t k = k0; k < k1; ++k) xt[k * ld + r] = r < b ? X[r * K + k] : 0.f;
  }
}

// Y[0..b, m0..m0+MR) from MR weight rows and NV vectors of batch rows.
template <typename V, int MR, int NV>
inline void bcast_tile(const float* W, const float* bias, const float* xt, int64_t ld, float* Y, int64_t b,
                       int64_t M, int64_t K, int64_t m0) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[MR][NV] = {};
  const float* w = W + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    V x[NV];
    for (int j = 0; j < NV; ++j) x[j] = loadv<V>(xt + k * ld + j * L);
    for (int i = 0; i < MR; ++i) {
      const V wb = V{} + w[i * K + k];
      for (int j = 0; j < NV; ++j) acc[i][j] += wb * x[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    const float add = bias ? bias[m0 + i] : 0.f;
    for (int j = 0; j < NV; ++j)
      for (int64_t r = j * L; r < b && r < (j + 1) * L; ++r) Y[r * M + m0 + i] = acc[i][j][r - j * L] + add;
  }
}

template <typename V, int MR, int NV>
void linear_bcast(const float* W, const float* bias, const float* xt, int64_t ld, float* Y, int64_t b, int64_t M,
                  int64_t K) {
  const int64_t tiles = (M + MR - 1) / MR;
#pragma omp for schedule(static) nowait
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = t * MR;
    if (m0 + MR <= M) {
      bcast_tile<V, MR, NV>(W, bias, xt, ld, Y, b, M, K, m0);
    } else {
      for (int64_t m = m0; m < M; ++m) bcast_tile<V, 1, NV>(W, bias, xt, ld, Y, b, M, K, m);
    }
  }
}

// Every thread of the team calls this (it holds worksharing loops). xt: a
// workspace of at least K * kBcastMaxRows floats shared by the team, or null
// (dot-product form only). Callers put a barrier between this and the next
// write of X or of xt.
void linear_rows(const WeightRef& w, const float* bias, const float* X, float* Y, int64_t b, int64_t M, int64_t K,
                 float* xt) {
  if (w.kind == kF32 && xt != nullptr && b >= kBcastMinRows && b <= kBcastMaxRows) {
    const float* W = static_cast<const float*>(w.data);
    const int64_t ld = bcast_ld(b);
    transpose_rows(X, b, K, xt, ld);
    if (ld == 8)
      linear_bcast<vf8, 12, 1>(W, bias, xt, ld, Y, b, M, K);
    else if (ld == 16)
      linear_bcast<vf16, 12, 1>(W, bias, xt, ld, Y, b, M, K);
    else
      linear_bcast<vf16, 8, 2>(W, bias, xt, ld, Y, b, M, K);
    return;
  }
  switch (w.kind) {
    case kI8:
#ifdef CRSM_INT8_VNNI
      linear_rows_q8(static_cast<const int8_t*>(w.data), w.scale, bias, X, Y, b, M, K);
#else
      linear_rows_t(static_cast<const int8_t*>(w.data), w.scale, bias, X, Y, b, M, K);
#endif
      break;
    case kBF16:
      linear_rows_t(static_cast<const uint16_t*>(w.data), nullptr, bias, X, Y, b, M, K);
      break;
    default:
      linear_rows_t(static_cast<const float*>(w.data), nullptr, bias, X, Y, b, M, K);
  }
}

// One dt_proj row (R wide) against one x_proj output row. int8 weights are
// widened against float32 activations here even on VNNI machines: the eager
// quantized step's crsm_linear quantizes activations to int16 once R >= 64
// (d_model >= 1009), so the two paths then differ by that rounding (2^-16
// of a block's largest value).
inline float dt_dot(const WeightRef& w, int64_t ch, int64_t R, const float* row) {
  switch (w.kind) {
    case kI8:
      return dot_1x1(static_cast<const int8_t*>(w.data) + ch * R, row, R) * w.scale[ch];
    case kBF16:
      return dot_1x1(static_cast<const uint16_t*>(w.data) + ch * R, row, R);
    default:
      return dot_1x1(static_cast<const float*>(w.data) + ch * R, row, R);
  }
}

// residual (+)= hidden; normed = norm(residual). One batch row per iteration.
void add_norm(const float* hidden, float* residual, float* normed, const float* w, const float* bias, bool first,
              bool rms, float eps, int64_t b, int64_t Dm) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < b; ++r) {
    float* res = residual + r * Dm;
    const float* hid = hidden + r * Dm;
    float* out = normed + r * Dm;
    float sum = 0.f, sq = 0.f;
    for (int64_t k = 0; k < Dm; ++k) {
      const float v = first ? hid[k] : hid[k] + res[k];
      res[k] = v;
      sum += v;
      sq += v * v;
    }
    if (rms) {
      const float inv = 1.0f / std::sqrt(sq / Dm + eps);
      for (int64_t k = 0; k < Dm; ++k) out[k] = res[k] * inv * w[k];
    } else {
      const float mean = sum / Dm;
      float var = 0.f;
      for (int64_t k = 0; k < Dm; ++k) var += (res[k] - mean) * (res[k] - mean);
      const float inv = 1.0f / std::sqrt(var / Dm + eps);
      for (int64_t k = 0; k < Dm; ++k) out[k] = (res[k] - mean) * inv * w[k] + (bias ? bias[k] : 0.f);
    }
  }
}

// The window of one channel and row shifts by one and takes the new input;
// returns the depthwise convolution before silu.
inline float conv_shift(const Dims& d, const float* xz, float* conv_state, const float* cw, const float* cb,
                        int64_t r, int64_t ch) {
  float* s = conv_state + (r * d.Di + ch) * d.K;
  float acc = cb ? cb[ch] : 0.f;
  for (int64_t k = 0; k + 1 < d.K; ++k) {
    s[k] = s[k + 1];
    acc += s[k] * cw[ch * d.K + k];
  }
  s[d.K - 1] = xz[r * 2 * d.Di + ch];
  return acc + s[d.K - 1] * cw[ch * d.K + d.K - 1];
}

// Conv window shift + depthwise conv + silu for every channel and row, in
// groups of 16 channels so that silu runs on vectors (a scalar exp and
// division per channel and row were ~3% of a 130M batch-32 step).
void conv_update(const Dims& d, const float* xz, float* conv_state, const float* cw, const float* cb, float* xc) {
  const int64_t groups = (d.Di + kLanes - 1) / kLanes;
#pragma omp for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * kLanes;
    for (int64_t r = 0; r < d.b; ++r) {
      if (c0 + kLanes > d.Di) {
        for (int64_t ch = c0; ch < d.Di; ++ch) xc[r * d.Di + ch] = silu(conv_shift(d, xz, conv_state, cw, cb, r, ch));
        continue;
      }
      vf16 acc;
      for (int j = 0; j < kLanes; ++j) acc[j] = conv_shift(d, xz, conv_state, cw, cb, r, c0 + j);
      store16(xc + r * d.Di + c0, silu_vec(acc));
    }
  }
}

// One channel's state update for batch row r: h = exp(dt A) h + dt x B, returns C . h.
inline float state_update(const Dims& d, const float* a2, const float* Bn, const float* Cn, float* h, float dt,
                          float dtx) {
  if (d.N == kLanes) {  // the usual d_state: one vector (the scalar loop below is not vectorised by gcc)
    const vf16 hv = exp2_vec(dt * load16(a2)) * load16(h) + dtx * load16(Bn);
    store16(h, hv);
    return hsum(load16(Cn) * hv);
  }
  float acc = 0.f;
  for (int64_t n = 0; n < d.N; ++n) {
    const float hv = exp2_fast(dt * a2[n]) * h[n] + dtx * Bn[n];
    h[n] = hv;
    acc += Cn[n] * hv;
  }
  return acc;
}

// dt_proj for 16 channels c0.. against one x_proj output row: 16 vector
// accumulators over R, one transposing sum (16 horizontal sums before).
template <typename WT>
inline vf16 dt_dot16_t(const WT* W, int64_t c0, int64_t R, const float* row) {
  vf16 a[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= R; k += kLanes) {
    const vf16 v = load16(row + k);
    for (int j = 0; j < kLanes; ++j) a[j] += load_w16(W + (c0 + j) * R + k) * v;
  }
  vf16 out = hsum16x16(a);
  for (; k < R; ++k)
    for (int j = 0; j < kLanes; ++j) out[j] += widen(W[(c0 + j) * R + k]) * row[k];
  return out;
}

inline vf16 dt_dot16(const WeightRef& w, int64_t c0, int64_t R, const float* row) {
  switch (w.kind) {
    case kI8:
      return dt_dot16_t(static_cast<const int8_t*>(w.data), c0, R, row) * load16(w.scale + c0);
    case kBF16:
      return dt_dot16_t(static_cast<const uint16_t*>(w.data), c0, R, row);
    default:
      return dt_dot16_t(static_cast<const float*>(w.data), c0, R, row);
  }
}

// dt_proj + softplus, state update, D skip and gate for every channel, in
// groups of 16 channels: dt's softplus, silu(z) and the output are computed
// on vectors across the group (per channel and row they were scalar
// polynomials: a quarter of a 130M batch-32 step), the state update per
// channel on a vector across d_state.
void ssm_update(const Dims& d, const float* const* w, const WeightRef& dt_w, const float* xz, const float* xc,
                const float* dbc, float* ssm, float* y) {
  const int64_t N = d.N, R = d.R, P = d.R + 2 * d.N, groups = (d.Di + kLanes - 1) / kLanes;
#pragma omp for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * kLanes;
    if (c0 + kLanes > d.Di) {  // a partial last group: channel by channel
      for (int64_t ch = c0; ch < d.Di; ++ch)
        for (int64_t r = 0; r < d.b; ++r) {
          const float* row = dbc + r * P;
          const float dt = softplus(w[kDtB][ch] + dt_dot(dt_w, ch, R, row)), xv = xc[r * d.Di + ch];
          const float acc = state_update(d, w[kA2] + ch * N, row + R, row + R + N, ssm + (r * d.Di + ch) * N, dt,
                                         dt * xv);
          y[r * d.Di + ch] = (acc + w[kDskip][ch] * xv) * silu(xz[r * 2 * d.Di + d.Di + ch]);
        }
      continue;
    }
    const vf16 bias = load16(w[kDtB] + c0), dskip = load16(w[kDskip] + c0);
    for (int64_t r = 0; r < d.b; ++r) {
      const float* row = dbc + r * P;
      const vf16 dt = softplus_vec(dt_dot16(dt_w, c0, R, row) + bias), xv = load16(xc + r * d.Di + c0),
                 dtx = dt * xv;
      vf16 acc;
      if (N == kLanes) {  // the usual d_state: one vector per channel, the 16 C . h sums at once
        const vf16 Bv = load16(row + R), Cv = load16(row + R + N);
        vf16 prod[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          float* h = ssm + (r * d.Di + c0 + j) * N;
          const vf16 hv = exp2_vec(dt[j] * load16(w[kA2] + (c0 + j) * N)) * load16(h) + dtx[j] * Bv;
          store16(h, hv);
          prod[j] = Cv * hv;
        }
        acc = hsum16x16(prod);
      } else {
        for (int j = 0; j < kLanes; ++j)
          acc[j] = state_update(d, w[kA2] + (c0 + j) * N, row + R, row + R + N, ssm + (r * d.Di + c0 + j) * N,
                                dt[j], dtx[j]);
      }
      store16(y + r * d.Di + c0, (acc + dskip * xv) * silu_vec(load16(xz + r * 2 * d.Di + d.Di + c0)));
    }
  }
}

}  // namespace

namespace {

// --- Mamba-2's decode step ------------------------------------------------------
//
// Per layer: norm, in_proj to [z, x, B, C, dt] (Dz = 2 Di + 2 G N + H wide),
// conv over the CC = Di + 2 G N channels of x, B and C, the SSD state
// update per head (state (H, P, N) per row), the gated RMSNorm per group of
// Di / G channels, out_proj. Pointers per layer, in this order:
enum Slot2 : int {
  k2NormW, k2NormB, k2InW, k2InB, k2ConvW, k2ConvB, k2DtBias, k2A, k2Dskip, k2GateNormW, k2OutW, k2OutB,
  k2InS, k2OutS, kPerLayer2
};

struct Dims2 {
  int64_t b, Dm, Di, N, H, P, G, K, CC, Dz;
};

// Conv window shift + depthwise conv + silu over the CC channels of x, B and
// C (in_proj's output columns Di .. Di + CC), in groups of 16 channels.
void conv_update2(const Dims2& d, const float* zx, float* conv_state, const float* cw, const float* cb, float* xc) {
  const int64_t groups = (d.CC + kLanes - 1) / kLanes;
#pragma omp for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * kLanes, c1 = c0 + kLanes < d.CC ? c0 + kLanes : d.CC;
    for (int64_t r = 0; r < d.b; ++r) {
      float acc[kLanes];
      for (int64_t ch = c0; ch < c1; ++ch) {
        float* s = conv_state + (r * d.CC + ch) * d.K;
        float a = cb ? cb[ch] : 0.f;
        for (int64_t k = 0; k + 1 < d.K; ++k) {
          s[k] = s[k + 1];
          a += s[k] * cw[ch * d.K + k];
        }
        s[d.K - 1] = zx[r * d.Dz + d.Di + ch];
        acc[ch - c0] = a + s[d.K - 1] * cw[ch * d.K + d.K - 1];
      }
      if (c1 - c0 == kLanes) {
        store16(xc + r * d.CC + c0, silu_vec(load16(acc)));
      } else {
        for (int64_t ch = c0; ch < c1; ++ch) xc[r * d.CC + ch] = silu(acc[ch - c0]);
      }
    }
  }
}

// The SSD state update for every (row, head): dt = clamp(softplus(dt_raw +
// bias)), h = exp(dt A) h + dt x B^T, y = h C + D x.
void ssd_update(const Dims2& d, const float* const* w, const float* zx, const float* xc, float* ssm, float* y,
                float dt_lo, float dt_hi) {
  const int64_t per_group = d.H / d.G;
#pragma omp for schedule(static)
  for (int64_t bh = 0; bh < d.b * d.H; ++bh) {
    const int64_t r = bh / d.H, head = bh % d.H, g = head / per_group;
    float dt = softplus(zx[r * d.Dz + d.Di + d.CC + head] + w[k2DtBias][head]);
    dt = dt < dt_lo ? dt_lo : (dt > dt_hi ? dt_hi : dt);
    const float decay = exp2_fast(dt * w[k2A][head] * kLog2e), skip = w[k2Dskip][head];
    const float* xs = xc + r * d.CC + head * d.P;
    const float* Bn = xc + r * d.CC + d.Di + g * d.N;
    const float* Cn = xc + r * d.CC + d.Di + d.G * d.N + g * d.N;
    float* state = ssm + (r * d.H + head) * d.P * d.N;
    float* ys = y + r * d.Di + head * d.P;
    for (int64_t p = 0; p < d.P; ++p) {
      const float u = dt * xs[p];
      float* row = state + p * d.N;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < d.N; ++n) {
        const float v = row[n] * decay + u * Bn[n];
        row[n] = v;
        acc += v * Cn[n];
      }
      ys[p] = acc + skip * xs[p];
    }
  }
}

// y = rmsnorm_group(y * silu(z)) * w (norm_before_gate: rmsnorm_group(y) * w * silu(z)), per (row, group).
void gated_norm(const Dims2& d, const float* zx, const float* gw, float eps, int norm_before_gate, float* y) {
  const int64_t size = d.Di / d.G;
#pragma omp for schedule(static)
  for (int64_t rg = 0; rg < d.b * d.G; ++rg) {
    const int64_t r = rg / d.G, c0 = (rg % d.G) * size;
    float* ys = y + r * d.Di + c0;
    const float* zs = zx + r * d.Dz + c0;
    float sq = 0.f;
    for (int64_t c = 0; c < size; ++c) {
      if (!norm_before_gate) ys[c] *= silu(zs[c]);
      sq += ys[c] * ys[c];
    }
    const float inv = 1.0f / std::sqrt(sq / size + eps);
    for (int64_t c = 0; c < size; ++c) {
      const float v = ys[c] * inv * gw[c0 + c];
      ys[c] = norm_before_gate ? v * silu(zs[c]) : v;
    }
  }
}

}  // namespace

extern "C" {

int crsm_abi_version() { return 5; }

// Mamba-2's decode step. h: (b, H, P, N) float32, batch stride sh_b, each
// row's (H, P, N) contiguous, advanced in place; x, y: (b, H, P); dt: (b, H)
// final (bias, softplus and clamp applied); A, D: (H,); B, C: (b, G, N),
// G dividing H. All contiguous except h's batch stride.
int crsm_ssd_step(float* h, int64_t sh_b, const float* x, const float* dt, const float* A, const float* B,
                  const float* C, const float* D, float* y, int64_t b, int64_t H, int64_t P, int64_t N, int64_t G,
                  int n_threads) {
  if (G < 1 || H % G != 0) return 1;
  const int64_t per_group = H / G;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t bh = 0; bh < b * H; ++bh) {
    const int64_t i = bh / H, head = bh % H, g = head / per_group;
    const float step = dt[i * H + head];
    const float decay = std::exp2(step * A[head] * kLog2e);
    const float* Bn = B + (i * G + g) * N;
    const float* Cn = C + (i * G + g) * N;
    float* state = h + i * sh_b + head * P * N;
    const float* xs = x + (i * H + head) * P;
    float* ys = y + (i * H + head) * P;
    const float skip = D[head];
    for (int64_t p = 0; p < P; ++p) {
      const float u = step * xs[p];
      float* row = state + p * N;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < N; ++n) {
        const float v = row[n] * decay + u * Bn[n];
        row[n] = v;
        acc += v * Cn[n];
      }
      ys[p] = acc + skip * xs[p];
    }
  }
  return 0;
}

// 1 when int8 weights meet int16-quantized activations (AVX512-VNNI), 0
// when they are widened to float32 against float32 activations.
int crsm_int8_vnni() {
#ifdef CRSM_INT8_VNNI
  return 1;
#else
  return 0;
#endif
}

// y (b, M) = x (b, K) W^T * scale + bias, W (M, K) row-major in `kind`
// (kF32, kI8 with `scale` (M,), kBF16); x, y float32 contiguous; bias and
// scale may be null.
int crsm_linear(int kind, const void* W, const float* scale, const float* bias, const float* x, float* y, int64_t b,
                int64_t M, int64_t K, int n_threads) {
  if (kind < kF32 || kind > kBF16 || (kind == kI8 && scale == nullptr)) return 1;
  const WeightRef w{W, scale, kind};
  std::vector<float> xt(b >= kBcastMinRows && b <= kBcastMaxRows && kind == kF32 ? K * kBcastMaxRows : 0);
#pragma omp parallel num_threads(n_threads)
  linear_rows(w, bias, x, y, b, M, K, xt.empty() ? nullptr : xt.data());
  return 0;
}

// Fused selective scan (see ScanArgs). x, dt, z: (b, L, D) with unit channel
// stride; B, C: (b, L, N) likewise; A2 = A * log2(e): (D, N); h: (b, D, N)
// start state, advanced in place; out: (b, L, D) contiguous; dt before its
// softplus when dt_softplus; lengths (b,) or null.
int crsm_selective_scan(const float* x, const float* dt, const float* z, const float* B, const float* C,
                        const float* A2, const float* Dskip, float* h, float* out, int64_t b, int64_t L, int64_t D,
                        int64_t N, const int64_t* strides, int dt_softplus, const int64_t* lengths, int n_threads) {
  if (N > kMaxState) return 1;
  ScanArgs a{x, dt, z, B, C, A2, Dskip, h, out, L, D, N,
             strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
             dt_softplus, lengths};
  const int64_t full = D / kLanes, tail = D - full * kLanes;
  const int64_t per_row = full + tail;  // full blocks, then single channels
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t i = 0; i < b * per_row; ++i) {
    const int64_t bi = i / per_row, j = i % per_row;
    if (j < full)
      scan_block16(a, bi, j * kLanes);
    else
      scan_block<1>(a, bi, full * kLanes + (j - full));
  }
  return 0;
}

// silu(causal depthwise conv) over x (b, L, D) (unit channel stride, strides
// sx_b, sx_t) continuing state (b, D, K) contiguous or null (zeros); w (D, K);
// bias (D,) or null; out (b, L, D) contiguous. The new state is the caller's.
int crsm_causal_conv(const float* x, int64_t sx_b, int64_t sx_t, const float* state, const float* w,
                     const float* bias, float* out, int64_t b, int64_t L, int64_t D, int64_t K, int n_threads) {
  if (K < 1 || K > kMaxConv) return 1;
  const int64_t full = D / kLanes, per_row = full + (D - full * kLanes);
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t i = 0; i < b * per_row; ++i) {
    const int64_t bi = i / per_row, j = i % per_row;
    if (j < full)
      conv_block16(x, sx_b, sx_t, state, w, bias, out, bi, j * kLanes, L, D, K);
    else
      conv_channel(x, sx_b, sx_t, state, w, bias, out, bi, full * kLanes + (j - full), L, D, K);
  }
  return 0;
}

// One decode step through n_layer layers and the final norm.
// weights: n_layer * kPerLayer pointers (nullable: norm bias, in/out bias,
// conv bias, the scales unless wkind is kI8); wkind: the projections' weight
// kind; hidden: (b, Dm) embeddings in; normed_out: (b, Dm) final-norm
// output; conv: layer l at conv + l * conv_layer_stride, (b, Di, K)
// contiguous; ssm likewise (b, Di, N).
int crsm_decode_layers(const void* const* weights, int wkind, const float* norm_f_w, const float* norm_f_b, int64_t n_layer,
                       int64_t b, int64_t Dm, int64_t Di, int64_t N, int64_t R, int64_t K, int rms, float eps,
                       float* hidden, float* normed_out, float* conv, int64_t conv_layer_stride, float* ssm,
                       int64_t ssm_layer_stride, int n_threads) {
  if (N > kMaxState || wkind < kF32 || wkind > kBF16) return 1;
  const Dims d{b, Dm, Di, N, R, K};
  std::vector<float> residual(b * Dm), normed(b * Dm), xz(b * 2 * Di), xc(b * Di), dbc(b * (R + 2 * N)),
      y(b * Di), xt(wkind == kF32 && b >= kBcastMinRows && b <= kBcastMaxRows ? (Dm > Di ? Dm : Di) * kBcastMaxRows : 0);
  float* const xtp = xt.empty() ? nullptr : xt.data();
#pragma omp parallel num_threads(n_threads)
  {
    for (int64_t l = 0; l < n_layer; ++l) {
      const float* const* w = reinterpret_cast<const float* const*>(weights + l * kPerLayer);
      const WeightRef in_w{w[kInW], w[kInS], wkind}, xp_w{w[kXpW], w[kXpS], wkind};
      const WeightRef dt_w{w[kDtW], w[kDtS], wkind}, out_w{w[kOutW], w[kOutS], wkind};
      add_norm(hidden, residual.data(), normed.data(), w[kNormW], w[kNormB], l == 0, rms, eps, b, Dm);
      linear_rows(in_w, w[kInB], normed.data(), xz.data(), b, 2 * Di, Dm, xtp);
#pragma omp barrier
      conv_update(d, xz.data(), conv + l * conv_layer_stride, w[kConvW], w[kConvB], xc.data());
      linear_rows(xp_w, nullptr, xc.data(), dbc.data(), b, R + 2 * N, Di, xtp);
#pragma omp barrier
      ssm_update(d, w, dt_w, xz.data(), xc.data(), dbc.data(), ssm + l * ssm_layer_stride, y.data());
      linear_rows(out_w, w[kOutB], y.data(), hidden, b, Dm, Di, xtp);
#pragma omp barrier
    }
    add_norm(hidden, residual.data(), normed_out, norm_f_w, norm_f_b, false, rms, eps, b, Dm);
  }
  return 0;
}

// Mamba-2's decode step through n_layer layers and the final norm (Slot2 for
// the pointers; dims as named; conv: layer l at conv + l * conv_layer_stride,
// (b, CC, K) contiguous; ssm likewise (b, H, P, N)).
int crsm_decode_layers2(const void* const* weights, int wkind, const float* norm_f_w, const float* norm_f_b,
                        int64_t n_layer, int64_t b, int64_t Dm, int64_t Di, int64_t N, int64_t H, int64_t G,
                        int64_t K, int rms, float eps, float gate_eps, int norm_before_gate, float dt_lo, float dt_hi,
                        float* hidden, float* normed_out, float* conv, int64_t conv_layer_stride, float* ssm,
                        int64_t ssm_layer_stride, int n_threads) {
  if (wkind < kF32 || wkind > kBF16 || H < 1 || G < 1 || H % G != 0 || Di % H != 0 || Di % G != 0) return 1;
  const int64_t CC = Di + 2 * G * N, Dz = Di + CC + H;
  const Dims2 d{b, Dm, Di, N, H, Di / H, G, K, CC, Dz};
  std::vector<float> residual(b * Dm), normed(b * Dm), zx(b * Dz), xc(b * CC), y(b * Di),
      xt(wkind == kF32 && b >= kBcastMinRows && b <= kBcastMaxRows ? (Dm > Di ? Dm : Di) * kBcastMaxRows : 0);
  float* const xtp = xt.empty() ? nullptr : xt.data();
#pragma omp parallel num_threads(n_threads)
  {
    for (int64_t l = 0; l < n_layer; ++l) {
      const float* const* w = reinterpret_cast<const float* const*>(weights + l * kPerLayer2);
      const WeightRef in_w{w[k2InW], w[k2InS], wkind}, out_w{w[k2OutW], w[k2OutS], wkind};
      add_norm(hidden, residual.data(), normed.data(), w[k2NormW], w[k2NormB], l == 0, rms, eps, b, Dm);
      linear_rows(in_w, w[k2InB], normed.data(), zx.data(), b, Dz, Dm, xtp);
#pragma omp barrier
      conv_update2(d, zx.data(), conv + l * conv_layer_stride, w[k2ConvW], w[k2ConvB], xc.data());
      ssd_update(d, w, zx.data(), xc.data(), ssm + l * ssm_layer_stride, y.data(), dt_lo, dt_hi);
      gated_norm(d, zx.data(), w[k2GateNormW], gate_eps, norm_before_gate, y.data());
      linear_rows(out_w, w[k2OutB], y.data(), hidden, b, Dm, Di, xtp);
#pragma omp barrier
    }
    add_norm(hidden, residual.data(), normed_out, norm_f_w, norm_f_b, false, rms, eps, b, Dm);
  }
  return 0;
}

}  // extern "C"
