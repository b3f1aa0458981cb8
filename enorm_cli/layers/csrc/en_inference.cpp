// EN at inference on CPU as one call per layer (enorm_cli/layers/native.py builds and loads
// it; the tensor-op path in exemplar_function.py is the definition and the fallback).
//
// On a CPU each of the fast path's ~30 small tensor ops costs a few microseconds, and its
// statistics and output are separate passes; here the instance statistics, every
// normalizer's statistics, the coefficients (the same math as en_coefficients) and
// Y = A X + B run as loops per sample. Built with reassociation allowed, so the sums
// vectorize (docs/performance.md). Inputs are contiguous and of one floating dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void coefficients_kernel(const T* m, const T* big_m, const T* big_s, const T* gamma,
                         const T* beta, const T* conv, const T* w1, const T* b1, const T* w2,
                         const T* b2, T* a, T* b, T* lam_out, int64_t k_count, int64_t n_count,
                         int64_t channels, int64_t groups, int64_t hidden, double eps, bool relu,
                         double logit_scale, bool shared_affine, int64_t begin, int64_t end) {
  const int64_t per_group = channels / groups;
  const int64_t zdim = conv ? groups : channels;
  std::vector<T> rstd(k_count * channels), xhat(k_count * channels), z(k_count * zdim);
  std::vector<T> vv(k_count * k_count);
  std::vector<T> h(hidden), lam(k_count);
  for (int64_t n = begin; n < end; ++n) {
    const T* mn = m + n * channels;
    for (int64_t k = 0; k < k_count; ++k) {
      const T* mk = big_m + (k * n_count + n) * channels;
      const T* sk = big_s + (k * n_count + n) * channels;
      T* rk = rstd.data() + k * channels;
      T* xk = xhat.data() + k * channels;
      for (int64_t c = 0; c < channels; ++c) {
        rk[c] = T(1) / std::sqrt(sk[c] + T(eps));
        xk[c] = (mn[c] - mk[c]) * rk[c];
      }
      T* zk = z.data() + k * zdim;
      if (conv) {
        for (int64_t g = 0; g < groups; ++g) {
          T acc = 0;
          for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) acc += conv[j] * xk[j];
          zk[g] = acc;
        }
      } else {
        std::copy(xk, xk + channels, zk);
      }
    }
    for (int64_t i = 0; i < k_count; ++i) {
      for (int64_t j = 0; j < k_count; ++j) {
        T acc = 0;
        for (int64_t g = 0; g < zdim; ++g) acc += z[i * zdim + g] * z[j * zdim + g];
        vv[i * k_count + j] = acc;
      }
    }
    const int64_t kk = k_count * k_count;
    for (int64_t o = 0; o < hidden; ++o) {
      T acc = b1[o];
      for (int64_t q = 0; q < kk; ++q) acc += w1[o * kk + q] * vv[q];
      h[o] = relu ? (acc > T(0) ? acc : T(0)) : std::tanh(acc);
    }
    T top = -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < k_count; ++k) {
      T acc = 0;
      for (int64_t o = 0; o < hidden; ++o) acc += w2[k * hidden + o] * h[o];
      lam[k] = b2[k] + T(logit_scale) * acc;
      top = std::max(top, lam[k]);
    }
    T total = 0;
    for (int64_t k = 0; k < k_count; ++k) {
      lam[k] = std::exp(lam[k] - top);
      total += lam[k];
    }
    for (int64_t k = 0; k < k_count; ++k) {
      lam[k] /= total;
      lam_out[n * k_count + k] = lam[k];
    }
    T* an = a + n * channels;
    T* bn = b + n * channels;
    std::fill(an, an + channels, T(0));
    if (shared_affine) {
      std::copy(beta, beta + channels, bn);
    } else {
      std::fill(bn, bn + channels, T(0));
    }
    for (int64_t k = 0; k < k_count; ++k) {
      const T lk = lam[k];
      const T* gk = gamma + (shared_affine ? 0 : k * channels);
      const T* bk = beta + k * channels;
      const T* rk = rstd.data() + k * channels;
      const T* mk = big_m + (k * n_count + n) * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const T mixed = lk * gk[c] * rk[c];
        an[c] += mixed;
        bn[c] -= mixed * mk[c];
        if (!shared_affine) bn[c] += lk * bk[c];
      }
    }
  }
}

// Samples per task so that a task has ATen's grain of work: small layers run on one thread
// (waking a second costs more than they take), large ones on all.
int64_t grain(int64_t work_per_sample) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_sample));
}

}  // namespace

// A, B (N x C) and lambda (N x K) from the instance means m (N x C), every normalizer's
// stacked mean and variance (K x N x C) and the layer's parameters; conv: C values or empty.
std::vector<at::Tensor> en_coefficients(at::Tensor m, at::Tensor big_m, at::Tensor big_s,
                                        at::Tensor gamma, at::Tensor beta, at::Tensor conv,
                                        int64_t groups, at::Tensor w1, at::Tensor b1,
                                        at::Tensor w2, at::Tensor b2, double eps, bool relu,
                                        double logit_scale, bool shared_affine) {
  const auto k_count = big_m.size(0), n_count = big_m.size(1), channels = big_m.size(2);
  const auto hidden = w1.size(0);
  auto a = at::empty({n_count, channels}, m.options());
  auto b = at::empty({n_count, channels}, m.options());
  auto lam = at::empty({n_count, k_count}, m.options());
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "en_coefficients", [&] {
    at::parallel_for(0, n_count, grain(k_count * channels), [&](int64_t begin, int64_t end) {
      coefficients_kernel<scalar_t>(
          m.data_ptr<scalar_t>(), big_m.data_ptr<scalar_t>(), big_s.data_ptr<scalar_t>(),
          gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          conv.numel() ? conv.data_ptr<scalar_t>() : nullptr, w1.data_ptr<scalar_t>(),
          b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), k_count,
          n_count, channels, groups, hidden, eps, relu, logit_scale, shared_affine, begin, end);
    });
  });
  return {a, b, lam};
}

// The whole layer at inference: instance statistics (two passes per row, as
// statistics.moments), every normalizer's statistics (codes: 0 bn, the running ones; 1 in;
// 2 ln; 3 gn over `gn_groups`), the coefficients above, and Y = A X + B. x: N x C x L.
at::Tensor en_inference(at::Tensor x, at::Tensor running_mean, at::Tensor running_var,
                        std::vector<int64_t> codes, int64_t gn_groups, at::Tensor gamma,
                        at::Tensor beta, at::Tensor conv, int64_t groups, at::Tensor w1,
                        at::Tensor b1, at::Tensor w2, at::Tensor b2, double eps, bool relu,
                        double logit_scale, bool shared_affine) {
  const auto n_count = x.size(0), channels = x.size(1), length = x.size(2);
  const auto k_count = static_cast<int64_t>(codes.size());
  auto m = at::empty({n_count, channels}, x.options());
  auto v = at::empty({n_count, channels}, x.options());
  auto big_m = at::empty({k_count, n_count, channels}, x.options());
  auto big_s = at::empty({k_count, n_count, channels}, x.options());
  auto y = at::empty_like(x);
  auto a = at::empty({n_count, channels}, x.options());
  auto b = at::empty({n_count, channels}, x.options());
  auto lam = at::empty({n_count, k_count}, x.options());
  const auto hidden = w1.size(0);
  // One parallel region, each task whole samples: statistics, coefficients, output.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "en_inference", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* bmp = big_m.data_ptr<scalar_t>();
    scalar_t* bsp = big_s.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rm = running_mean.data_ptr<scalar_t>();
    const scalar_t* rv = running_var.data_ptr<scalar_t>();
    const auto work = channels * (3 * length + k_count);
    at::parallel_for(0, n_count, grain(work), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* row = xp + (n * channels + c) * length;
          scalar_t sum = 0;
          for (int64_t i = 0; i < length; ++i) sum += row[i];
          const scalar_t mean = sum / length;
          scalar_t sq = 0;
          for (int64_t i = 0; i < length; ++i) sq += (row[i] - mean) * (row[i] - mean);
          mp[n * channels + c] = mean;
          vp[n * channels + c] = sq / length;
        }
        for (int64_t k = 0; k < k_count; ++k) {
          scalar_t* mk = bmp + (k * n_count + n) * channels;
          scalar_t* sk = bsp + (k * n_count + n) * channels;
          const scalar_t* mn = mp + n * channels;
          const scalar_t* vn = vp + n * channels;
          if (codes[k] == 0) {
            std::copy(rm, rm + channels, mk);
            std::copy(rv, rv + channels, sk);
          } else if (codes[k] == 1) {
            std::copy(mn, mn + channels, mk);
            std::copy(vn, vn + channels, sk);
          } else {  // pooled: mean of means, law of total variance
            const int64_t parts = codes[k] == 2 ? 1 : gn_groups, size = channels / parts;
            for (int64_t g = 0; g < parts; ++g) {
              scalar_t pm = 0, pv = 0;
              for (int64_t c = g * size; c < (g + 1) * size; ++c) pm += mn[c];
              pm /= size;
              for (int64_t c = g * size; c < (g + 1) * size; ++c)
                pv += vn[c] + (mn[c] - pm) * (mn[c] - pm);
              pv /= size;
              std::fill(mk + g * size, mk + (g + 1) * size, pm);
              std::fill(sk + g * size, sk + (g + 1) * size, pv);
            }
          }
        }
      }
      coefficients_kernel<scalar_t>(
          mp, bmp, bsp, gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
          conv.numel() ? conv.data_ptr<scalar_t>() : nullptr, w1.data_ptr<scalar_t>(),
          b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), ap, bp,
          lam.data_ptr<scalar_t>(), k_count, n_count, channels, groups, hidden, eps, relu,
          logit_scale, shared_affine, begin, end);
      for (int64_t r = begin * channels; r < end * channels; ++r) {
        const scalar_t ar = ap[r], br = bp[r];
        for (int64_t i = 0; i < length; ++i) yp[r * length + i] = ar * xp[r * length + i] + br;
      }
    });
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("en_coefficients", &en_coefficients, "EN's coefficients without autograd (CPU)");
  module.def("en_inference", &en_inference, "EN at inference, the whole layer (CPU)");
}
