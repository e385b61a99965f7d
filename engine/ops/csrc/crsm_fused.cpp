// Fused CPU kernels for the Mamba-1 engine (float32), called through ctypes.
//
// No torch headers: the file builds with a plain `g++ -O3 -march=native
// -fopenmp -shared` in about a second (including <torch/extension.h> costs
// tens of seconds on a 2-core machine). Tensors arrive as raw pointers plus
// the strides the Python side has checked. OpenMP resolves to the libgomp
// torch has already loaded (same soname), so torch and these kernels share
// one thread pool instead of fighting over the cores.
//
// Two entry points:
//   crsm_selective_scan: prefill's scan, fused with the D skip and the
//     silu(z) gate; channels in parallel, 16 channels per SIMD vector, time
//     sequential (one pass over L, nothing materialised per step).
//   crsm_decode_layers: one decode step through every layer (residual add,
//     norm, in_proj, conv update, x_proj, dt_proj + softplus, state update,
//     gate, out_proj) and the final norm, inside one OpenMP region: what
//     eager PyTorch does in ~25 ops per layer, each paying dispatch cost.

#include <omp.h>

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

inline vf16 exp2_vec(vf16 x) {
  const vf16 lo = vf16{} - 126.f, hi = vf16{} + 126.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf16 magic = vf16{} + 12582912.f;  // 1.5 * 2^23: (x + magic) - magic rounds to nearest
  const vf16 xi = (x + magic) - magic;
  const vf16 f = x - xi;
  vf16 p = vf16{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi16 bits = (__builtin_convertvector(xi, vi16) + 127) << 23;
  return p * (vf16)bits;  // a vector cast reinterprets the bits
}

inline vf16 silu_vec(vf16 v) { return v / (1.0f + exp2_vec(-v * kLog2e)); }

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

// --- Prefill scan -----------------------------------------------------------

struct ScanArgs {
  const float *x, *dt, *z, *B, *C, *A2, *Dskip;
  float *h, *out;
  int64_t L, D, N;
  int64_t sx_b, sx_t, sdt_b, sdt_t, sz_b, sz_t, sbc_b, sbc_t;  // strides (elements) of batch and time
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
  for (int64_t t = 0; t < a.L; ++t) {
    const float *xt = xb + t * a.sx_t, *dtt = dtb + t * a.sdt_t, *zt = zb + t * a.sz_t;
    const float *Bt = Bb + t * a.sbc_t, *Ct = Cb + t * a.sbc_t;
    float dtv[W], dtx[W], y[W];
    for (int j = 0; j < W; ++j) {
      dtv[j] = dtt[j];
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
  for (int64_t t = 0; t < a.L; ++t) {
    const vf16 xv = load16(xb + t * a.sx_t), dtv = load16(dtb + t * a.sdt_t), dtx = dtv * xv;
    const float *Bt = Bb + t * a.sbc_t, *Ct = Cb + t * a.sbc_t;
    vf16 y = vf16{};
    for (int64_t n = 0; n < N; ++n) {
      const vf16 hv = exp2_vec(dtv * al[n]) * hl[n] + dtx * Bt[n];
      hl[n] = hv;
      y += Ct[n] * hv;
    }
    store16(ob + t * D, (y + dsk * xv) * silu_vec(load16(zb + t * a.sz_t)));
  }
  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < kLanes; ++j) hrow[(d0 + j) * N + n] = hl[n][j];
}

// --- Decode step ---------------------------------------------------------------

// Per-layer weights, in the order the Python side packs them.
enum : int {
  kNormW, kNormB, kInW, kInB, kConvW, kConvB, kXpW, kDtW, kDtB, kA2, kDskip, kOutW, kOutB, kPerLayer
};

struct Dims {
  int64_t b, Dm, Di, N, R, K;
};

// Four weight rows against four batch rows: 16 independent accumulators,
// 8 vector loads per 16 FMAs (a 4x1 dot needs 5 loads per 4 FMAs).
inline void dot_4x4(const float* w0, const float* x0, int64_t K, float* Y, int64_t M) {
  const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
  float a00 = 0.f, a01 = 0.f, a02 = 0.f, a03 = 0.f, a10 = 0.f, a11 = 0.f, a12 = 0.f, a13 = 0.f;
  float a20 = 0.f, a21 = 0.f, a22 = 0.f, a23 = 0.f, a30 = 0.f, a31 = 0.f, a32 = 0.f, a33 = 0.f;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
  for (int64_t k = 0; k < K; ++k) {
    const float v0 = x0[k], v1 = x1[k], v2 = x2[k], v3 = x3[k];
    a00 += w0[k] * v0, a01 += w1[k] * v0, a02 += w2[k] * v0, a03 += w3[k] * v0;
    a10 += w0[k] * v1, a11 += w1[k] * v1, a12 += w2[k] * v1, a13 += w3[k] * v1;
    a20 += w0[k] * v2, a21 += w1[k] * v2, a22 += w2[k] * v2, a23 += w3[k] * v2;
    a30 += w0[k] * v3, a31 += w1[k] * v3, a32 += w2[k] * v3, a33 += w3[k] * v3;
  }
  float* y0 = Y;  // row r of the batch, column m0
  y0[0] = a00, y0[1] = a01, y0[2] = a02, y0[3] = a03;
  y0 += M, y0[0] = a10, y0[1] = a11, y0[2] = a12, y0[3] = a13;
  y0 += M, y0[0] = a20, y0[1] = a21, y0[2] = a22, y0[3] = a23;
  y0 += M, y0[0] = a30, y0[1] = a31, y0[2] = a32, y0[3] = a33;
}

// Y[r, m] = W[m, :] . X[r, :] + bias[m] for rows m of this thread's share.
// Four weight rows at a time: independent accumulators hide FMA latency and
// each loaded row block is reused for every batch row while it sits in L1.
void linear_rows(const float* W, const float* bias, const float* X, float* Y, int64_t b, int64_t M, int64_t K) {
#pragma omp for schedule(static) nowait
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t rows = M - m0 < 4 ? M - m0 : 4;
    int64_t r = 0;
    if (rows == 4)
      for (; r + 4 <= b; r += 4) dot_4x4(W + m0 * K, X + r * K, K, Y + r * M + m0, M);
    for (; r < b; ++r) {
      const float* xr = X + r * K;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      if (rows == 4) {
        const float *w0 = W + m0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < K; ++k) {
          a0 += w0[k] * xr[k];
          a1 += w1[k] * xr[k];
          a2 += w2[k] * xr[k];
          a3 += w3[k] * xr[k];
        }
        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          const float* wi = W + (m0 + i) * K;
          float a = 0.f;
#pragma omp simd reduction(+ : a)
          for (int64_t k = 0; k < K; ++k) a += wi[k] * xr[k];
          acc[i] = a;
        }
      }
      for (int64_t i = 0; i < rows; ++i) Y[r * M + m0 + i] = acc[i];
    }
    if (bias)
      for (int64_t r2 = 0; r2 < b; ++r2)
        for (int64_t i = 0; i < rows; ++i) Y[r2 * M + m0 + i] += bias[m0 + i];
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

// Conv window shift + depthwise conv + silu for channels [m0, m1) of every row.
void conv_update(const Dims& d, const float* xz, float* conv_state, const float* cw, const float* cb, float* xc) {
#pragma omp for schedule(static)
  for (int64_t ch = 0; ch < d.Di; ++ch) {
    for (int64_t r = 0; r < d.b; ++r) {
      float* s = conv_state + (r * d.Di + ch) * d.K;
      float acc = cb ? cb[ch] : 0.f;
      for (int64_t k = 0; k + 1 < d.K; ++k) {
        s[k] = s[k + 1];
        acc += s[k] * cw[ch * d.K + k];
      }
      s[d.K - 1] = xz[r * 2 * d.Di + ch];
      acc += s[d.K - 1] * cw[ch * d.K + d.K - 1];
      xc[r * d.Di + ch] = silu(acc);
    }
  }
}

// dt_proj + softplus, state update, D skip and gate for every channel.
void ssm_update(const Dims& d, const float* const* w, const float* xz, const float* xc, const float* dbc, float* ssm,
                float* y) {
  const int64_t N = d.N, R = d.R, P = d.R + 2 * d.N;
#pragma omp for schedule(static)
  for (int64_t ch = 0; ch < d.Di; ++ch) {
    const float* dtw = w[kDtW] + ch * R;
    const float* a2 = w[kA2] + ch * N;
    for (int64_t r = 0; r < d.b; ++r) {
      const float* row = dbc + r * P;
      float v = w[kDtB][ch];
      for (int64_t k = 0; k < R; ++k) v += dtw[k] * row[k];
      const float dt = softplus(v), xv = xc[r * d.Di + ch], dtx = dt * xv;
      const float *Bn = row + R, *Cn = row + R + N;
      float* h = ssm + (r * d.Di + ch) * N;
      float acc = 0.f;
      if (N == kLanes) {  // the usual d_state: one vector (the scalar loop below is not vectorised by gcc)
        const vf16 hv = exp2_vec(dt * load16(a2)) * load16(h) + dtx * load16(Bn);
        store16(h, hv);
        const vf16 prod = load16(Cn) * hv;
        for (int j = 0; j < kLanes; ++j) acc += prod[j];
      } else {
        for (int64_t n = 0; n < N; ++n) {
          const float hv = exp2_fast(dt * a2[n]) * h[n] + dtx * Bn[n];
          h[n] = hv;
          acc += Cn[n] * hv;
        }
      }
      const float zv = xz[r * 2 * d.Di + d.Di + ch];
      y[r * d.Di + ch] = (acc + w[kDskip][ch] * xv) * silu(zv);
    }
  }
}

}  // namespace

extern "C" {

int crsm_abi_version() { return 1; }

// Fused selective scan (see ScanArgs). x, dt, z: (b, L, D) with unit channel
// stride; B, C: (b, L, N) likewise; A2 = A * log2(e): (D, N); h: (b, D, N)
// start state, advanced in place; out: (b, L, D) contiguous.
int crsm_selective_scan(const float* x, const float* dt, const float* z, const float* B, const float* C,
                        const float* A2, const float* Dskip, float* h, float* out, int64_t b, int64_t L, int64_t D,
                        int64_t N, const int64_t* strides, int n_threads) {
  if (N > kMaxState) return 1;
  ScanArgs a{x, dt, z, B, C, A2, Dskip, h, out, L, D, N,
             strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7]};
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

// One decode step through n_layer layers and the final norm.
// weights: n_layer * kPerLayer pointers (nullable: norm bias, in/out bias,
// conv bias); hidden: (b, Dm) embeddings in; normed_out: (b, Dm) final-norm
// output; conv: layer l at conv + l * conv_layer_stride, (b, Di, K)
// contiguous; ssm likewise (b, Di, N).
int crsm_decode_layers(const float* const* weights, const float* norm_f_w, const float* norm_f_b, int64_t n_layer,
                       int64_t b, int64_t Dm, int64_t Di, int64_t N, int64_t R, int64_t K, int rms, float eps,
                       float* hidden, float* normed_out, float* conv, int64_t conv_layer_stride, float* ssm,
                       int64_t ssm_layer_stride, int n_threads) {
  if (N > kMaxState) return 1;
  const Dims d{b, Dm, Di, N, R, K};
  std::vector<float> residual(b * Dm), normed(b * Dm), xz(b * 2 * Di), xc(b * Di), dbc(b * (R + 2 * N)),
      y(b * Di);
#pragma omp parallel num_threads(n_threads)
  {
    for (int64_t l = 0; l < n_layer; ++l) {
      const float* const* w = weights + l * kPerLayer;
      add_norm(hidden, residual.data(), normed.data(), w[kNormW], w[kNormB], l == 0, rms, eps, b, Dm);
      linear_rows(w[kInW], w[kInB], normed.data(), xz.data(), b, 2 * Di, Dm);
#pragma omp barrier
      conv_update(d, xz.data(), conv + l * conv_layer_stride, w[kConvW], w[kConvB], xc.data());
      linear_rows(w[kXpW], nullptr, xc.data(), dbc.data(), b, R + 2 * N, Di);
#pragma omp barrier
      ssm_update(d, w, xz.data(), xc.data(), dbc.data(), ssm + l * ssm_layer_stride, y.data());
      linear_rows(w[kOutW], w[kOutB], y.data(), hidden, b, Dm, Di);
#pragma omp barrier
    }
    add_norm(hidden, residual.data(), normed_out, norm_f_w, norm_f_b, false, rms, eps, b, Dm);
  }
  return 0;
}

}  // extern "C"
