// EN on CPU as a few C++ calls per layer (enorm_cli/layers/native.py builds and loads it;
// the tensor-op path in exemplar_function.py is the definition, the fallback and the
// reference the tests hold this to).
//
// On a CPU each of the tensor-op path's small ops costs microseconds whatever its size: EN's
// coefficient math is ~35 of them forward and ~60 backward per layer, and ATen's reductions
// over the short rows of small maps (2 x 2, 4 x 4) are slow too. Here each sample's rows and
// its K x C statistics are loops, all samples of a call in one parallel region:
//   en_moments     X (N x C x L) -> instance mean and biased variance m, v (two passes a row)
//   en_forward     X, m, v, the bn member's mean and variance -> Y = A X + B, A, and the ratio
//                  branch's v = z z^T, h and lambda (what the backward reads)
//   en_backward    X, dY -> sum(dY X), sum(dY) per row -> dL/dm, dL/dv through every
//                  normalizer's statistics but the bn member's batch statistics (their two
//                  gradient sums come back), and the parameters' gradients
//   en_input_grad  dX = A dY + alpha X + beta, from dL/dm, dL/dv
//   en_inference   the whole eval layer in one call (en_moments + en_forward, running stats)
// The bn member's batch statistics (synced over processes, renormalized) and their backward
// stay tensor ops in Python: per-channel vectors, with an all-reduce between the calls.
// Built with reassociation allowed, so the sums vectorize (docs/performance.md). Inputs are
// contiguous and of one floating dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

enum Code : int64_t { kBn = 0, kIn = 1, kLn = 2, kGn = 3 };

// The loops over C, L and the hidden units live in these small functions: their __restrict__
// arguments tell the compiler the arrays do not overlap, without which it keeps the loops
// scalar (they read and write several arrays of one sample).
#define EN_R __restrict__

// A sum of term(i) over i < n. Long rows keep kLanes partial sums: one accumulator chains each
// vector add on the previous one's latency (a row's sum then runs at a quarter of the adder's
// throughput); short rows (maps of 5 x 5, 10 x 10) would spend more on folding the partials.
constexpr int64_t kLanes = 16;

template <typename T, typename Term>
inline T reduce(int64_t n, Term term) {
  T acc = 0;
  if (n < 4 * kLanes) {
    for (int64_t i = 0; i < n; ++i) acc += term(i);
    return acc;
  }
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += term(i + j);
  for (; i < n; ++i) acc += term(i);
  for (int64_t j = 0; j < kLanes; ++j) acc += part[j];
  return acc;
}

template <typename T>
inline T dot(int64_t n, const T* a, const T* b) {
  return reduce<T>(n, [=](int64_t i) { return a[i] * b[i]; });
}

template <typename T>
inline void axpy(int64_t n, T alpha, const T* EN_R x, T* EN_R y) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
inline void add(int64_t n, const T* EN_R x, T* EN_R y) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

template <typename T>
inline T sum(int64_t n, const T* x) {
  return reduce<T>(n, [=](int64_t i) { return x[i]; });
}

// sum((x - shift)^2).
template <typename T>
inline T squared_deviation(int64_t n, T shift, const T* x) {
  return reduce<T>(n, [=](int64_t i) { return (x[i] - shift) * (x[i] - shift); });
}

// Mean and biased variance of one row (two passes: exact where E[x^2] - E[x]^2 would cancel,
// and the row is in cache for the second).
template <typename T>
inline void row_moment(int64_t length, const T* EN_R row, T* EN_R mean_out, T* EN_R var_out) {
  const T mean = sum(length, row) / length;
  *mean_out = mean;
  *var_out = squared_deviation(length, mean, row) / length;
}

// R = (S + eps)^-1/2.
template <typename T>
inline void inverse_std(int64_t n, T eps, const T* EN_R sk, T* EN_R rk) {
  for (int64_t c = 0; c < n; ++c) rk[c] = T(1) / std::sqrt(sk[c] + eps);
}

// Xhat = (m - M) R.
template <typename T>
inline void deviation(int64_t n, const T* EN_R mn, const T* EN_R mk, const T* EN_R rk,
                      T* EN_R xk) {
  for (int64_t c = 0; c < n; ++c) xk[c] = (mn[c] - mk[c]) * rk[c];
}

// tanh: float32 by the rational approximation Eigen uses (its generic_fast_tanh_float, MPL-2.0;
// within 3.5e-7 of tanh, and plain arithmetic, so the loop over the hidden units vectorizes,
// where libm's tanhf is a call per unit); float64 by std::tanh.
inline float fast_tanh(float a) {
  const float x = std::max(-7.90531110763549805f, std::min(7.90531110763549805f, a));
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = x2 * p + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  float q = 1.19825839466702e-06f;
  q = x2 * q + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return std::abs(a) < 0.0004f ? a : p / q;
}

inline double fast_tanh(double a) { return std::tanh(a); }

// h = tanh(h) or relu(h) over the hidden units.
template <typename T>
inline void activate(int64_t n, bool relu, T* EN_R h) {
  if (relu) {
    for (int64_t o = 0; o < n; ++o) h[o] = h[o] > T(0) ? h[o] : T(0);
  } else {
    for (int64_t o = 0; o < n; ++o) h[o] = fast_tanh(h[o]);
  }
}

// A += lambda_k gamma_k R_k, B -= lambda_k gamma_k R_k M_k (+ lambda_k beta_k unless shared).
template <typename T>
inline void mix(int64_t n, T lk, const T* EN_R gk, const T* EN_R bk, const T* EN_R rk,
                const T* EN_R mk, bool shared, T* EN_R an, T* EN_R bn) {
  if (shared) {
    for (int64_t c = 0; c < n; ++c) {
      const T mixed = lk * gk[c] * rk[c];
      an[c] += mixed;
      bn[c] -= mixed * mk[c];
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const T mixed = lk * gk[c] * rk[c];
      an[c] += mixed;
      bn[c] = bn[c] - mixed * mk[c] + lk * bk[c];
    }
  }
}

// mix's backward for one normalizer: dL/dgamma_k += dL/dmixed lambda_k R_k, dL/dR_k and
// dL/dM_k of this term; returns dL/dlambda_k's part sum_c dL/dmixed gamma_k R_k.
template <typename T>
inline T mix_backward(int64_t n, T lk, const T* EN_R da, const T* EN_R db, const T* EN_R gk,
                      const T* EN_R rk, const T* EN_R mk, T* EN_R g_gamma, T* EN_R g_rstd,
                      T* EN_R g_mk) {
  T dot_out = 0;
  for (int64_t c = 0; c < n; ++c) {
    const T g_mixed = da[c] - db[c] * mk[c];
    const T scale = gk[c] * rk[c];
    dot_out += g_mixed * scale;
    const T g_scale = g_mixed * lk;
    g_gamma[c] += g_scale * rk[c];
    g_rstd[c] = g_scale * gk[c];
    g_mk[c] = -(lk * scale) * db[c];
  }
  return dot_out;
}

// Xhat_k's gradient into m, M_k and R_k (then S_k): g_r = dL/dR + g_xhat (m - M), dL/dm +=
// g_xhat R, dL/dM -= g_xhat R, dL/dS = -g_r R^3 / 2 (written over g_rs).
template <typename T>
inline void xhat_backward(int64_t n, const T* EN_R g_xhat, const T* EN_R mn, const T* EN_R mk,
                          const T* EN_R rk, T* EN_R gm, T* EN_R g_mk, T* EN_R g_rs) {
  for (int64_t c = 0; c < n; ++c) {
    const T g_r = g_rs[c] + g_xhat[c] * (mn[c] - mk[c]);
    const T g_dev = g_xhat[c] * rk[c];
    gm[c] += g_dev;
    g_mk[c] -= g_dev;
    g_rs[c] = g_r * (rk[c] * rk[c] * rk[c]) * T(-0.5);
  }
}

// A pooled normalizer's (mean, var) gradient back to the rows it pools: dL/dm += g_mean +
// 2 (m - mean) g_var, dL/dv += g_var.
template <typename T>
inline void pooled_backward(int64_t n, T g_mean, T g_var, const T* EN_R mn, const T* EN_R mk,
                            T* EN_R gm, T* EN_R gv) {
  for (int64_t c = 0; c < n; ++c) {
    gm[c] += g_mean + T(2) * (mn[c] - mk[c]) * g_var;
    gv[c] += g_var;
  }
}

// dX = A dY + alpha X + beta over one row.
template <typename T>
inline void input_grad_row(int64_t length, T a, T alpha, T beta, const T* EN_R gy,
                           const T* EN_R x, T* EN_R gx) {
  for (int64_t i = 0; i < length; ++i) gx[i] = a * gy[i] + alpha * x[i] + beta;
}

// Y = A X + B over one row.
template <typename T>
inline void affine_row(int64_t length, T a, T b, const T* EN_R x, T* EN_R y) {
  for (int64_t i = 0; i < length; ++i) y[i] = a * x[i] + b;
}

// The layer's parameters and settings, as the per-sample math reads them.
template <typename T>
struct Layer {
  std::vector<int64_t> codes;  // one per normalizer (Code)
  int64_t gn_groups;
  const T* bn_mean;  // C: the bn member's statistics (the running ones at inference)
  std::vector<T> bn_rstd;  // (var + eps)^-1/2, once per call: every sample shares it
  const T* gamma;  // K x C, or 1 x C shared
  const T* beta;
  const T* conv;  // C weights of the grouped conv, or nullptr (z = xhat)
  const T* w1t;   // FC1's weight transposed, K^2 x hidden: the loops run along hidden
  const T* b1;
  const T* w2;  // K x hidden
  const T* b2;
  const T* offset;  // K: the mixing weights are lambda + offset (nullptr: 0)
  int64_t channels, groups, hidden;
  T eps, logit_scale;
  bool relu, shared_affine;

  int64_t k() const { return static_cast<int64_t>(codes.size()); }
  int64_t kk() const { return k() * k(); }
  int64_t zdim() const { return conv ? groups : channels; }
  // w_k = lambda_k + o_k, what multiplies normalizer k's output (exemplar_function.mixing_weights).
  T mix_weight(const T* lam, int64_t k) const { return offset ? lam[k] + offset[k] : lam[k]; }
};

// One sample's statistics and pre-normalized features (recomputed by the backward); its
// ratio-branch values (v, h, lambda) live in the callers' N-row tensors.
template <typename T>
struct Sample {
  std::vector<T> big_m, rstd, xhat, z;
  explicit Sample(const Layer<T>& l)
      : big_m(l.k() * l.channels),
        rstd(l.k() * l.channels),
        xhat(l.k() * l.channels),
        z(l.k() * l.zdim()) {}
};

// Mean and biased variance of each of `rows` consecutive rows of length L.
template <typename T>
void row_moments(const T* x, int64_t rows, int64_t length, T* mn, T* vn) {
  for (int64_t r = 0; r < rows; ++r) row_moment(length, x + r * length, mn + r, vn + r);
}

// Every normalizer's mean M and R = (S + eps)^-1/2 (K x C) from a sample's instance row
// mn, vn (bn: the layer's row; in: the row; ln, gn: pooled, mean of means and law of total
// variance, one R per group), then Xhat = (m - M) R and z (the grouped conv of Xhat over C).
template <typename T>
void normalize(const Layer<T>& l, const T* mn, const T* vn, Sample<T>& s) {
  const int64_t c_count = l.channels, zdim = l.zdim(), per_group = c_count / l.groups;
  for (int64_t k = 0; k < l.k(); ++k) {
    T* mk = s.big_m.data() + k * c_count;
    T* rk = s.rstd.data() + k * c_count;
    const int64_t code = l.codes[k];
    if (code == kBn) {
      std::copy(l.bn_mean, l.bn_mean + c_count, mk);
      std::copy(l.bn_rstd.begin(), l.bn_rstd.end(), rk);
    } else if (code == kIn) {
      std::copy(mn, mn + c_count, mk);
      inverse_std(c_count, l.eps, vn, rk);
    } else {
      const int64_t parts = code == kLn ? 1 : l.gn_groups, size = c_count / parts;
      for (int64_t g = 0; g < parts; ++g) {
        const int64_t begin = g * size;
        const T pm = sum(size, mn + begin) / size;
        T pv = 0;
        for (int64_t c = begin; c < begin + size; ++c) pv += vn[c] + (mn[c] - pm) * (mn[c] - pm);
        pv /= size;
        std::fill(mk + begin, mk + begin + size, pm);
        std::fill(rk + begin, rk + begin + size, T(1) / std::sqrt(pv + l.eps));
      }
    }
    T* xk = s.xhat.data() + k * c_count;
    deviation(c_count, mn, mk, rk, xk);
    T* zk = s.z.data() + k * zdim;
    if (l.conv) {
      for (int64_t g = 0; g < l.groups; ++g)
        zk[g] = dot(per_group, l.conv + g * per_group, xk + g * per_group);
    } else {
      std::copy(xk, xk + c_count, zk);
    }
  }
}

// The ratio branch and the coefficients of a normalized sample: v = z z^T, h = act(FC1 v),
// lambda = softmax(b2 + s W2 h), w = lambda + o, A = sum_k w_k gamma_k R_k and
// B = w beta - sum_k w_k gamma_k R_k M_k (exemplar_function.en_coefficients's math,
// docs/en-layer.md) into vv, h, lam (K^2, hidden, K) and an, bn_out (C).
template <typename T>
void coefficients(const Layer<T>& l, const Sample<T>& s, T* vv, T* h, T* lam, T* an, T* bn_out) {
  const int64_t k_count = l.k(), c_count = l.channels, zdim = l.zdim(), kk = l.kk();
  for (int64_t i = 0; i < k_count; ++i) {
    for (int64_t j = 0; j < k_count; ++j)
      vv[i * k_count + j] = dot(zdim, s.z.data() + i * zdim, s.z.data() + j * zdim);
  }
  std::copy(l.b1, l.b1 + l.hidden, h);
  for (int64_t q = 0; q < kk; ++q) axpy(l.hidden, vv[q], l.w1t + q * l.hidden, h);
  activate(l.hidden, l.relu, h);
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < k_count; ++k) {
    lam[k] = l.b2[k] + l.logit_scale * dot(l.hidden, l.w2 + k * l.hidden, h);
    top = std::max(top, lam[k]);
  }
  T total = 0;
  for (int64_t k = 0; k < k_count; ++k) {
    lam[k] = std::exp(lam[k] - top);
    total += lam[k];
  }
  for (int64_t k = 0; k < k_count; ++k) lam[k] /= total;
  std::fill(an, an + c_count, T(0));
  if (l.shared_affine) {
    std::copy(l.beta, l.beta + c_count, bn_out);
  } else {
    std::fill(bn_out, bn_out + c_count, T(0));
  }
  for (int64_t k = 0; k < k_count; ++k) {
    const T* gk = l.gamma + (l.shared_affine ? 0 : k * c_count);
    const T* bk = l.beta + (l.shared_affine ? 0 : k * c_count);
    const T* rk = s.rstd.data() + k * c_count;
    const T* mk = s.big_m.data() + k * c_count;
    mix(c_count, l.mix_weight(lam, k), gk, bk, rk, mk, l.shared_affine, an, bn_out);
  }
}

// Y = A X + B over a sample's C rows.
template <typename T>
void apply_rows(const T* x, const T* an, const T* bn, int64_t channels, int64_t length, T* y) {
  for (int64_t c = 0; c < channels; ++c)
    affine_row(length, an[c], bn[c], x + c * length, y + c * length);
}

// Offsets of each parameter's gradient in a task's flat accumulator (FC1's transposed, as
// the loops run).
struct GradLayout {
  int64_t gamma, beta, conv, w1t, b1, w2, b2, bn_sums, size;
  GradLayout(int64_t channels, int64_t k, int64_t rows, bool has_conv, int64_t hidden) {
    gamma = 0;
    beta = gamma + rows * channels;
    conv = beta + rows * channels;
    w1t = conv + (has_conv ? channels : 0);
    b1 = w1t + k * k * hidden;
    w2 = b1 + hidden;
    b2 = w2 + k * hidden;
    bn_sums = b2 + k;
    size = bn_sums + 2 * channels;
  }
};

// Scratch of one sample's backward.
template <typename T>
struct SampleGrad {
  std::vector<T> g_big_m, g_big_s, g_lam, g_pre, g_vv, g_z, g_xhat, da, db;
  explicit SampleGrad(const Layer<T>& l)
      : g_big_m(l.k() * l.channels),
        g_big_s(l.k() * l.channels),
        g_lam(l.k()),
        g_pre(l.hidden),
        g_vv(l.kk()),
        g_z(l.k() * l.zdim()),
        g_xhat(l.channels),
        da(l.channels),
        db(l.channels) {}
};

// One sample's backward, the hand-written backward of exemplar_function in its notation:
// dL/dA, dL/dB (w.da, w.db) -> dL/dm, dL/dv (gm, gv) through every normalizer's statistics
// but the bn member's batch statistics, whose two column sums go to acc[bn_sums] (when
// bn_trained); the parameters' gradients are added to acc. s: the recomputed normalization;
// vv, h, lam: the forward's.
template <typename T>
void sample_backward(const Layer<T>& l, const GradLayout& slot, const T* mn, const Sample<T>& s,
                     const T* vv, const T* h, const T* lam, bool bn_trained, SampleGrad<T>& w,
                     T* gm, T* gv, T* acc) {
  const int64_t k_count = l.k(), c_count = l.channels, zdim = l.zdim(), kk = l.kk();
  const int64_t per_group = c_count / l.groups;
  const T* dan = w.da.data();
  const T* dbn = w.db.data();
  // A = sum_k w_k gamma_k R_k, B = w beta - sum_k w_k gamma_k R_k M_k, w = lambda + o.
  for (int64_t k = 0; k < k_count; ++k) {
    const int64_t row = l.shared_affine ? 0 : k;
    const T wk = l.mix_weight(lam, k);
    w.g_lam[k] = mix_backward(c_count, wk, dan, dbn, l.gamma + row * c_count,
                              s.rstd.data() + k * c_count, s.big_m.data() + k * c_count,
                              acc + slot.gamma + row * c_count,
                              w.g_big_s.data() + k * c_count,  // dL/dR for now
                              w.g_big_m.data() + k * c_count);
    if (!l.shared_affine) {
      w.g_lam[k] += dot(c_count, dbn, l.beta + k * c_count);
      axpy(c_count, wk, dbn, acc + slot.beta + k * c_count);
    }
  }
  if (l.shared_affine) add(c_count, dbn, acc + slot.beta);
  // lambda -> softmax -> FC2 -> act -> FC1 -> z z^T -> z.
  T mean_g = 0;
  for (int64_t k = 0; k < k_count; ++k) mean_g += lam[k] * w.g_lam[k];
  T* g_pre = w.g_pre.data();
  std::fill(g_pre, g_pre + l.hidden, T(0));
  for (int64_t k = 0; k < k_count; ++k) {
    const T g_logit = lam[k] * (w.g_lam[k] - mean_g);
    acc[slot.b2 + k] += g_logit;
    const T scaled = l.logit_scale * g_logit;
    axpy(l.hidden, scaled, h, acc + slot.w2 + k * l.hidden);
    axpy(l.hidden, scaled, l.w2 + k * l.hidden, g_pre);  // dL/dh for now
  }
  for (int64_t o = 0; o < l.hidden; ++o)
    g_pre[o] = l.relu ? (h[o] > T(0) ? g_pre[o] : T(0)) : g_pre[o] * (T(1) - h[o] * h[o]);
  add(l.hidden, g_pre, acc + slot.b1);
  for (int64_t q = 0; q < kk; ++q) {
    axpy(l.hidden, vv[q], g_pre, acc + slot.w1t + q * l.hidden);
    w.g_vv[q] = dot(l.hidden, g_pre, l.w1t + q * l.hidden);
  }
  for (int64_t i = 0; i < k_count; ++i) {
    T* gzi = w.g_z.data() + i * zdim;
    std::fill(gzi, gzi + zdim, T(0));
    for (int64_t j = 0; j < k_count; ++j) {
      const T sym = w.g_vv[i * k_count + j] + w.g_vv[j * k_count + i];
      axpy(zdim, sym, s.z.data() + j * zdim, gzi);
    }
  }
  // z -> Xhat = D R -> m, M, R (and the conv weight); R -> S.
  std::fill(gm, gm + c_count, T(0));
  std::fill(gv, gv + c_count, T(0));
  T* g_xhat = w.g_xhat.data();
  for (int64_t k = 0; k < k_count; ++k) {
    const T* gzk = w.g_z.data() + k * zdim;
    if (l.conv) {
      const T* xk = s.xhat.data() + k * c_count;
      for (int64_t g = 0; g < l.groups; ++g) {
        const int64_t begin = g * per_group;
        axpy(per_group, gzk[g], xk + begin, acc + slot.conv + begin);
        for (int64_t c = begin; c < begin + per_group; ++c) g_xhat[c] = gzk[g] * l.conv[c];
      }
    } else {
      std::copy(gzk, gzk + c_count, g_xhat);
    }
    xhat_backward(c_count, g_xhat, mn, s.big_m.data() + k * c_count,
                  s.rstd.data() + k * c_count, gm, w.g_big_m.data() + k * c_count,
                  w.g_big_s.data() + k * c_count);  // now dL/dS
  }
  // M, S -> each normalizer's statistics -> m, v. Pooled ones (law of total variance):
  // d mean/dm = 1/count, d var/dv = 1/count, d var/dm = 2 (m - mean)/count.
  for (int64_t k = 0; k < k_count; ++k) {
    const T* g_mk = w.g_big_m.data() + k * c_count;
    const T* g_sk = w.g_big_s.data() + k * c_count;
    const int64_t code = l.codes[k];
    if (code == kBn) {
      if (!bn_trained) continue;  // running statistics are constants
      add(c_count, g_mk, acc + slot.bn_sums);
      add(c_count, g_sk, acc + slot.bn_sums + c_count);
    } else if (code == kIn) {
      add(c_count, g_mk, gm);
      add(c_count, g_sk, gv);
    } else {
      const T* mk = s.big_m.data() + k * c_count;
      const int64_t parts = code == kLn ? 1 : l.gn_groups, size = c_count / parts;
      for (int64_t g = 0; g < parts; ++g) {
        const int64_t begin = g * size;
        pooled_backward(size, sum(size, g_mk + begin) / size, sum(size, g_sk + begin) / size,
                        mn + begin, mk + begin, gm + begin, gv + begin);
      }
    }
  }
}

// Samples per task so that a task has ATen's grain of work: small layers run on one thread
// (waking a second costs more than they take), large ones on all.
int64_t grain(int64_t work_per_sample) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_sample));
}

// Values per (sample, channel) row of an N x C x ... tensor (H x W for images).
int64_t row_length(const at::Tensor& x) {
  const auto rows = x.size(0) * x.size(1);
  return rows ? x.numel() / rows : 0;
}

const at::Tensor& checked(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "en kernel: inputs must be contiguous");
  return t;
}

// The arguments every call takes after its own, as the Python side (native.py) passes them.
struct LayerArgs {
  std::vector<int64_t> codes;
  int64_t gn_groups;
  at::Tensor bn_mean, bn_var, gamma, beta, conv;
  int64_t groups;
  at::Tensor w1t, b1, w2, b2;
  double eps;
  bool relu;
  double logit_scale;
  bool shared_affine;
  at::Tensor offset;

  template <typename T>
  Layer<T> layer(int64_t channels) const {
    Layer<T> l;
    l.codes = codes;
    l.gn_groups = gn_groups;
    l.bn_mean = bn_mean.numel() ? checked(bn_mean).data_ptr<T>() : nullptr;
    if (bn_var.numel()) {
      l.bn_rstd.resize(channels);
      inverse_std(channels, T(eps), checked(bn_var).data_ptr<T>(), l.bn_rstd.data());
    }
    l.gamma = checked(gamma).data_ptr<T>();
    l.beta = checked(beta).data_ptr<T>();
    l.conv = conv.numel() ? checked(conv).data_ptr<T>() : nullptr;
    l.w1t = checked(w1t).data_ptr<T>();
    l.b1 = checked(b1).data_ptr<T>();
    l.w2 = checked(w2).data_ptr<T>();
    l.b2 = checked(b2).data_ptr<T>();
    l.offset = offset.numel() ? checked(offset).data_ptr<T>() : nullptr;
    l.channels = channels;
    l.groups = groups;
    l.hidden = w2.size(1);
    l.eps = T(eps);
    l.logit_scale = T(logit_scale);
    l.relu = relu;
    l.shared_affine = shared_affine;
    for (auto code : codes)
      TORCH_CHECK(code != kBn || l.bn_mean, "en kernel: bn needs its mean and variance");
    return l;
  }
};

LayerArgs layer_args(std::vector<int64_t> codes, int64_t gn_groups, at::Tensor bn_mean,
                     at::Tensor bn_var, at::Tensor gamma, at::Tensor beta, at::Tensor conv,
                     int64_t groups, at::Tensor w1t, at::Tensor b1, at::Tensor w2, at::Tensor b2,
                     double eps, bool relu, double logit_scale, bool shared_affine,
                     at::Tensor offset) {
  return {std::move(codes), gn_groups, bn_mean, bn_var, gamma, beta, conv, groups, w1t,
          b1, w2, b2, eps, relu, logit_scale, shared_affine, offset};
}

#define EN_LAYER_PARAMS                                                                     \
  std::vector<int64_t> codes, int64_t gn_groups, at::Tensor bn_mean, at::Tensor bn_var,   \
      at::Tensor gamma, at::Tensor beta, at::Tensor conv, int64_t groups, at::Tensor w1t,   \
      at::Tensor b1, at::Tensor w2, at::Tensor b2, double eps, bool relu, double logit_scale, \
      bool shared_affine, at::Tensor offset
#define EN_LAYER_ARGS                                                                      \
  layer_args(codes, gn_groups, bn_mean, bn_var, gamma, beta, conv, groups, w1t, b1, w2, b2, \
             eps, relu, logit_scale, shared_affine, offset)

}  // namespace

// The instance table: mean and biased variance (N x C) of each row of x (N x C x ...).
std::vector<at::Tensor> en_moments(at::Tensor x) {
  const auto n_count = x.size(0), channels = x.size(1), length = row_length(x);
  auto m = at::empty({n_count, channels}, x.options());
  auto v = at::empty({n_count, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "en_moments", [&] {
    using T = scalar_t;
    const T* xp = checked(x).data_ptr<T>();
    T* mp = m.data_ptr<T>();
    T* vp = v.data_ptr<T>();
    at::parallel_for(0, n_count * channels, grain(2 * length), [&](int64_t begin, int64_t end) {
      row_moments(xp + begin * length, end - begin, length, mp + begin, vp + begin);
    });
  });
  return {m, v};
}

// Y = A X + B (X: N x C x ..., Y its shape) with EN's coefficients from the instance table m, v and the bn
// member's mean and variance (C each; empty without bn). Also returns A (N x C) and the ratio
// branch's v = z z^T (N x K^2), h (N x hidden) and lambda (N x K), which en_backward reads.
// Codes: 0 bn, 1 in, 2 ln, 3 gn over gn_groups.
std::vector<at::Tensor> en_forward(at::Tensor x, at::Tensor m, at::Tensor v, EN_LAYER_PARAMS) {
  const auto n_count = x.size(0), channels = x.size(1), length = row_length(x);
  const auto args = EN_LAYER_ARGS;
  const auto k_count = static_cast<int64_t>(codes.size()), hidden = w2.size(1);
  auto y = at::empty_like(x);
  auto a = at::empty({n_count, channels}, x.options());
  auto vv = at::empty({n_count, k_count * k_count}, x.options());
  auto h = at::empty({n_count, hidden}, x.options());
  auto lam = at::empty({n_count, k_count}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "en_forward", [&] {
    using T = scalar_t;
    const auto l = args.layer<T>(channels);
    const T* xp = checked(x).data_ptr<T>();
    const T* mp = checked(m).data_ptr<T>();
    const T* vp = checked(v).data_ptr<T>();
    T* yp = y.data_ptr<T>();
    T* ap = a.data_ptr<T>();
    T* vvp = vv.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    T* lp = lam.data_ptr<T>();
    const auto work = channels * (length + 4 * k_count) + hidden * k_count * k_count;
    at::parallel_for(0, n_count, grain(work), [&](int64_t begin, int64_t end) {
      Sample<T> s(l);
      std::vector<T> bn(channels);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t row = n * channels;
        normalize(l, mp + row, vp + row, s);
        coefficients(l, s, vvp + n * k_count * k_count, hp + n * hidden, lp + n * k_count,
                     ap + row, bn.data());
        apply_rows(xp + row * length, ap + row, bn.data(), channels, length, yp + row * length);
      }
    });
  });
  return {y, a, vv, h, lam};
}

// en_forward's backward from X and dY (N x C x ...): dL/dA = sum(dY X) and dL/dB = sum(dY) per
// row, then dL/dm and dL/dv (N x C) through every normalizer's statistics but the bn member's
// batch statistics, whose gradients come back as their two column sums (2 x C: dL/dM_bn and
// dL/dS_bn summed over the samples; zeros unless bn_trained), and the gradients of gamma,
// beta, the conv (empty without), FC1's weight (transposed, as w1t) and bias, FC2's weight
// and bias. Each task sums
// its samples' parameter gradients and the tasks' sums are added in order: the same result
// for the same thread count.
std::vector<at::Tensor> en_backward(at::Tensor x, at::Tensor grad_y, at::Tensor m, at::Tensor v,
                                    at::Tensor vv, at::Tensor h, at::Tensor lam,
                                    bool bn_trained, EN_LAYER_PARAMS) {
  const auto n_count = x.size(0), channels = x.size(1), length = row_length(x);
  const auto args = EN_LAYER_ARGS;
  const auto k_count = static_cast<int64_t>(codes.size()), hidden = w2.size(1);
  const int64_t rows = shared_affine ? 1 : k_count;
  const GradLayout slots(channels, k_count, rows, conv.numel() > 0, hidden);
  auto g_m = at::empty({n_count, channels}, m.options());
  auto g_v = at::empty({n_count, channels}, m.options());
  at::Tensor totals;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "en_backward", [&] {
    using T = scalar_t;
    const auto l = args.layer<T>(channels);
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const auto work = channels * (2 * length + 8 * k_count) + 4 * hidden * k_count * k_count;
    const int64_t per_task = std::max<int64_t>(grain(work), (n_count + threads - 1) / threads);
    const int64_t tasks = (n_count + per_task - 1) / per_task;
    auto partial = at::zeros({tasks, slots.size}, m.options());
    const T* xp = checked(x).data_ptr<T>();
    const T* gyp = checked(grad_y).data_ptr<T>();
    const T* mp = checked(m).data_ptr<T>();
    const T* vp = checked(v).data_ptr<T>();
    const T* vvp = checked(vv).data_ptr<T>();
    const T* hp = checked(h).data_ptr<T>();
    const T* lp = checked(lam).data_ptr<T>();
    T* gmp = g_m.data_ptr<T>();
    T* gvp = g_v.data_ptr<T>();
    T* pp = partial.data_ptr<T>();
    at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
      Sample<T> s(l);
      SampleGrad<T> w(l);
      for (int64_t t = first; t < last; ++t) {
        for (int64_t n = t * per_task; n < std::min(n_count, (t + 1) * per_task); ++n) {
          const int64_t row = n * channels;
          for (int64_t c = 0; c < channels; ++c) {
            const T* gr = gyp + (row + c) * length;
            w.da[c] = dot(length, gr, xp + (row + c) * length);
            w.db[c] = sum(length, gr);
          }
          normalize(l, mp + row, vp + row, s);
          sample_backward(l, slots, mp + row, s, vvp + n * k_count * k_count, hp + n * hidden,
                          lp + n * k_count, bn_trained, w, gmp + row, gvp + row,
                          pp + t * slots.size);
        }
      }
    });
    totals = tasks == 1 ? partial[0] : partial.sum(0);
  });
  auto piece = [&](int64_t begin, int64_t end) { return totals.slice(0, begin, end); };
  return {g_m,
          g_v,
          piece(slots.bn_sums, slots.size).view({2, channels}),
          piece(slots.gamma, slots.beta).view({rows, channels}),
          piece(slots.beta, slots.conv).view({rows, channels}),
          piece(slots.conv, slots.w1t),
          piece(slots.w1t, slots.b1).view({k_count * k_count, hidden}),
          piece(slots.b1, slots.w2),
          piece(slots.w2, slots.b2).view({k_count, hidden}),
          piece(slots.b2, slots.bn_sums)};
}

// dL/dX of Y = A X + B with A, B functions of X's instance mean and variance:
// dX = A dY + g_m / L + 2 g_v (X - m) / L, one pass over X and dY (N x C x ...).
at::Tensor en_input_grad(at::Tensor x, at::Tensor grad_y, at::Tensor a, at::Tensor m,
                         at::Tensor g_m, at::Tensor g_v) {
  const auto n_count = x.size(0), channels = x.size(1), length = row_length(x);
  auto grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "en_input_grad", [&] {
    using T = scalar_t;
    const T* xp = checked(x).data_ptr<T>();
    const T* gyp = checked(grad_y).data_ptr<T>();
    const T* ap = checked(a).data_ptr<T>();
    const T* mp = checked(m).data_ptr<T>();
    const T* gmp = checked(g_m).data_ptr<T>();
    const T* gvp = checked(g_v).data_ptr<T>();
    T* gxp = grad_x.data_ptr<T>();
    at::parallel_for(0, n_count * channels, grain(3 * length), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T ar = ap[r], alpha = gvp[r] * (T(2) / length);
        const T beta = gmp[r] / length - alpha * mp[r];
        input_grad_row(length, ar, alpha, beta, gyp + r * length, xp + r * length,
                       gxp + r * length);
      }
    });
  });
  return grad_x;
}

// The whole layer at inference, one parallel region with whole samples per task: instance
// statistics, en_forward's math with the running statistics as the bn member's, Y = A X + B.
at::Tensor en_inference(at::Tensor x, EN_LAYER_PARAMS) {
  const auto n_count = x.size(0), channels = x.size(1), length = row_length(x);
  const auto args = EN_LAYER_ARGS;
  const auto k_count = static_cast<int64_t>(codes.size()), hidden = w2.size(1);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "en_inference", [&] {
    using T = scalar_t;
    const auto l = args.layer<T>(channels);
    const T* xp = checked(x).data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const auto work = channels * (3 * length + 4 * k_count) + hidden * k_count * k_count;
    at::parallel_for(0, n_count, grain(work), [&](int64_t begin, int64_t end) {
      Sample<T> s(l);
      std::vector<T> mn(channels), vn(channels), an(channels), bn(channels);
      std::vector<T> vv(k_count * k_count), h(hidden), lam(k_count);
      for (int64_t n = begin; n < end; ++n) {
        const T* xn = xp + n * channels * length;
        row_moments(xn, channels, length, mn.data(), vn.data());
        normalize(l, mn.data(), vn.data(), s);
        coefficients(l, s, vv.data(), h.data(), lam.data(), an.data(), bn.data());
        apply_rows(xn, an.data(), bn.data(), channels, length, yp + n * channels * length);
      }
    });
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("en_moments", &en_moments, "instance mean and variance per row (CPU)");
  module.def("en_forward", &en_forward, "EN's training forward, Y = A X + B (CPU)");
  module.def("en_backward", &en_backward, "en_forward's backward up to dL/dm, dL/dv (CPU)");
  module.def("en_input_grad", &en_input_grad, "dL/dX from dL/dm, dL/dv (CPU)");
  module.def("en_inference", &en_inference, "EN at inference, the whole layer (CPU)");
}
