// CPU kernels of the lt_recipes ops, for float32 and (the float64 path: tests against float64 oracles) float64.
//
// d is cut into fixed chunks of kChunk elements that at::parallel_for hands to threads; every reduction keeps one
// partial per chunk and the partials are added in chunk order, so results are identical for any thread count.
// Inside a chunk, blocks of kBlock elements stay in L1 while all G rows are worked on. On x86-64 with GCC the
// kernels are compiled for AVX2+FMA, AVX and baseline SSE2, and the loader picks the best the CPU has.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "lt_ops.h"

namespace lt_recipes {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "avx", "default")))
#else
#define LT_SIMD_CLONES
#endif
#define LT_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kBlock = 512;

int64_t num_chunks(int64_t d) { return std::max<int64_t>(1, (d + kChunk - 1) / kChunk); }

// Four doubles / floats as one value (GCC/Clang vector extensions): the compiler maps them to whatever SIMD width
// the target has, and eight lanes of partial sums in two of them keep the add latency off the critical path while
// the summation order stays fixed.
typedef double double4 __attribute__((vector_size(32)));
typedef float float4 __attribute__((vector_size(16)));

LT_INLINE double4 load4(const float* p) {
  float4 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, double4);
}

LT_INLINE double4 load4(const double* p) {
  double4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LT_INLINE double sum8(double4 a, double4 b) {
  const double4 s = a + b;
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// dot += sum_i x_i y_i and sq += sum_i x_i^2, in double (fp32 products are exact in double).
template <typename T>
LT_INLINE void dot_sq(const T* x, const double* y, int64_t n, double& dot, double& sq) {
  double4 d0 = {}, d1 = {}, s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const double4 x0 = load4(x + i), x1 = load4(x + i + 4);
    d0 += x0 * load4(y + i);
    d1 += x1 * load4(y + i + 4);
    s0 += x0 * x0;
    s1 += x1 * x1;
  }
  double dt = sum8(d0, d1), st = sum8(s0, s1);
  for (; i < n; ++i) {
    const double v = x[i];
    dt += v * y[i];
    st += v * v;
  }
  dot += dt;
  sq += st;
}

// One chunk [begin, end) of gsa_project: writes global_grad there and adds, to partial (2G + 1 doubles),
// <grads_g, global> at g, ||grads_g||^2 at G + g and ||global||^2 at 2G. T is float32 or float64 (the inputs').
template <typename T>
LT_SIMD_CLONES void gsa_project_chunk(const T* grads, const T* weights, T* global, int64_t G, int64_t d,
                                      int64_t begin, int64_t end, double* partial) {
  double acc[kBlock];
  double gl[kBlock];
  double unused = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    std::fill(acc, acc + n, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      const double w = weights[g];
      const T* row = grads + g * d + b;
      for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<double>(row[i]);
    }
    T* out = global + b;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>(acc[i]);
      gl[i] = static_cast<double>(out[i]);
    }
    dot_sq(out, gl, n, partial[2 * G], unused);
    for (int64_t g = 0; g < G; ++g) dot_sq(grads + g * d + b, gl, n, partial[g], partial[G + g]);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> gsa_project_typed(const at::Tensor& grads, const at::Tensor& weights,
                                                     const at::Tensor& global) {
  const int64_t G = grads.size(0);
  const int64_t d = grads.size(1);
  const int64_t k = 2 * G + 1;
  const int64_t chunks = num_chunks(d);
  std::vector<double> partials(chunks * k, 0.0);
  const T* g_ptr = grads.const_data_ptr<T>();
  const T* w_ptr = weights.const_data_ptr<T>();
  T* out_ptr = global.mutable_data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      gsa_project_chunk(g_ptr, w_ptr, out_ptr, G, d, c * kChunk, std::min(d, (c + 1) * kChunk), &partials[c * k]);
    }
  });
  std::vector<double> total(k, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < k; ++j) total[j] += partials[c * k + j];
  }
  at::Tensor coef = at::empty({G}, weights.options());
  at::Tensor residual = at::empty({G}, weights.options());
  T* coef_ptr = coef.mutable_data_ptr<T>();
  T* res_ptr = residual.mutable_data_ptr<T>();
  const double gg = total[2 * G];
  for (int64_t g = 0; g < G; ++g) {
    const double c = gg > 0.0 ? total[g] / gg : 0.0;
    coef_ptr[g] = static_cast<T>(c);
    res_ptr[g] = static_cast<T>(std::sqrt(std::max(0.0, total[G + g] - c * total[g])));
  }
  return {coef, residual};
}

std::tuple<at::Tensor, at::Tensor> gsa_project_cpu(const at::Tensor& grads, const at::Tensor& weights,
                                                    const at::Tensor& global) {
  check_gsa_project(grads, weights, global);
  return grads.scalar_type() == at::kDouble ? gsa_project_typed<double>(grads, weights, global)
                                            : gsa_project_typed<float>(grads, weights, global);
}

// One chunk of gkp_penalty: returns sum_i sum_j coef_j F_ji (theta_i - a_ji)^2 over the chunk and, when grad is
// given, adds 2 sum_j coef_j F_ji (theta_i - a_ji) to it. Per element the G terms add in T (theta's dtype, float32
// or float64), across elements in double.
template <typename T, typename TA, typename TF>
LT_SIMD_CLONES double gkp_chunk(const T* theta, const TA* anchors, const TF* fisher, const T* coef, T* grad,
                                int64_t G, int64_t d, int64_t begin, int64_t end) {
  T gacc[kBlock];
  T vacc[kBlock];
  double4 v0 = {}, v1 = {};
  double tail = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const T* th = theta + b;
    std::fill(gacc, gacc + n, T(0));
    std::fill(vacc, vacc + n, T(0));
    for (int64_t j = 0; j < G; ++j) {
      const T c = coef[j];
      const TA* a = anchors + j * d + b;
      const TF* f = fisher + j * d + b;
      for (int64_t i = 0; i < n; ++i) {
        const T diff = th[i] - static_cast<T>(a[i]);
        const T cfd = c * static_cast<T>(f[i]) * diff;
        gacc[i] += cfd;
        vacc[i] += cfd * diff;
      }
    }
    if (grad != nullptr) {
      T* out = grad + b;
      for (int64_t i = 0; i < n; ++i) out[i] += T(2) * gacc[i];
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      v0 += load4(vacc + i);
      v1 += load4(vacc + i + 4);
    }
    for (; i < n; ++i) tail += static_cast<double>(vacc[i]);
  }
  return sum8(v0, v1) + tail;
}

template <typename T>
at::Tensor gkp_typed(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                     const at::Tensor& coef, const at::Tensor* grad_out) {
  constexpr bool kWide = std::is_same_v<T, double>;
  const int64_t G = anchors.size(0);
  const int64_t d = theta.size(0);
  const int64_t chunks = num_chunks(d);
  std::vector<double> partials(chunks, 0.0);
  const T* th = theta.const_data_ptr<T>();
  const T* c = coef.const_data_ptr<T>();
  T* grad = grad_out != nullptr ? grad_out->mutable_data_ptr<T>() : nullptr;
  dispatch_stored<kWide>(anchors.scalar_type(), [&](auto a_tag) {
    using TA = decltype(a_tag);
    dispatch_stored<kWide>(fisher.scalar_type(), [&](auto f_tag) {
      using TF = decltype(f_tag);
      const TA* a = anchors.const_data_ptr<TA>();
      const TF* f = fisher.const_data_ptr<TF>();
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t k = c0; k < c1; ++k) {
          partials[k] = gkp_chunk(th, a, f, c, grad, G, d, k * kChunk, std::min(d, (k + 1) * kChunk));
        }
      });
    });
  });
  double total = 0.0;
  for (double p : partials) total += p;
  at::Tensor value = at::empty({}, theta.options());
  *value.mutable_data_ptr<T>() = static_cast<T>(total);
  return value;
}

at::Tensor gkp_cpu(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                   const at::Tensor& coef, const at::Tensor* grad_out) {
  check_gkp(theta, anchors, fisher, coef, grad_out);
  return theta.scalar_type() == at::kDouble ? gkp_typed<double>(theta, anchors, fisher, coef, grad_out)
                                            : gkp_typed<float>(theta, anchors, fisher, coef, grad_out);
}

at::Tensor gkp_penalty_cpu(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                           const at::Tensor& coef) {
  return gkp_cpu(theta, anchors, fisher, coef, nullptr);
}

at::Tensor gkp_penalty_accumulate_cpu(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                                      const at::Tensor& coef, const at::Tensor& grad_out) {
  return gkp_cpu(theta, anchors, fisher, coef, &grad_out);
}

}  // namespace
}  // namespace lt_recipes

TORCH_LIBRARY_IMPL(lt_recipes, CPU, m) {
  m.impl("gsa_project", &lt_recipes::gsa_project_cpu);
  m.impl("gkp_penalty", &lt_recipes::gkp_penalty_cpu);
  m.impl("gkp_penalty_accumulate", &lt_recipes::gkp_penalty_accumulate_cpu);
}
