// EN's per-sample coefficient math without autograd, one call per layer (CPU).
//
// The same math as exemplar_function.en_coefficients from the stacked statistics on: on a
// CPU each of its ~30 small tensor ops costs a few microseconds whatever its size, here
// they are one loop per sample. Inputs are contiguous and of one floating dtype.
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
                         double logit_scale, bool shared_affine) {
  const int64_t per_group = channels / groups;
  const int64_t zdim = conv ? groups : channels;
  at::parallel_for(0, n_count, 1, [&](int64_t begin, int64_t end) {
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
  });
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
    coefficients_kernel<scalar_t>(
        m.data_ptr<scalar_t>(), big_m.data_ptr<scalar_t>(), big_s.data_ptr<scalar_t>(),
        gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
        conv.numel() ? conv.data_ptr<scalar_t>() : nullptr, w1.data_ptr<scalar_t>(),
        b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(),
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(), k_count,
        n_count, channels, groups, hidden, eps, relu, logit_scale, shared_affine);
  });
  return {a, b, lam};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("en_coefficients", &en_coefficients, "EN's coefficients without autograd (CPU)");
}
