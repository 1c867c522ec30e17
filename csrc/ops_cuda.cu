// CUDA kernels of the lt_recipes ops (float32 only: float64 inputs are refused, the float64 path is the CPU's).
//
// Each op is one grid-stride kernel that reads every input once, reduces its per-thread float64 partials with warp
// shuffles and a shared-memory pass into one partial per block, and a one-block kernel that adds the block
// partials in a fixed order and finishes the result on the device: no host synchronization, no atomics, and the
// same result on every run for a given GPU.
#include <algorithm>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lt_ops.h"

namespace lt_recipes {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Block total of v, valid in thread 0; scratch holds kWarps doubles and may be reused after the call.
__device__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (warp == 0 && lane < kWarps) ? scratch[lane] : 0.0;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// Blocks for a grid-stride kernel over d elements on the current device: enough to fill the GPU, no more than
// there is work for.
int grid_for(int64_t d) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t fill = static_cast<int64_t>(sms) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(fill, (d + kThreads - 1) / kThreads)));
}

// Per block: partials[block * (2G + 1) + k] with k = g: <grads_g, global>, G + g: ||grads_g||^2, 2G: ||global||^2.
// MAXG >= G is a compile-time bound so the 2 * MAXG accumulators live in registers.
template <int MAXG>
__global__ void __launch_bounds__(kThreads)
    gsa_project_kernel(const float* __restrict__ grads, const float* __restrict__ weights,
                       float* __restrict__ global, double* __restrict__ partials, int G, int64_t d) {
  __shared__ double scratch[(2 * MAXG + 1) * kWarps];
  float w[MAXG];
  double dot[MAXG];
  double sq[MAXG];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    w[g] = g < G ? weights[g] : 0.0f;
    dot[g] = 0.0;
    sq[g] = 0.0;
  }
  double gg = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < d; i += stride) {
    float x[MAXG];
    double acc = 0.0;
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g < G) {
        x[g] = __ldg(grads + g * d + i);
        acc += static_cast<double>(w[g]) * x[g];
      }
    }
    const float v = static_cast<float>(acc);
    global[i] = v;
    const double vd = v;
    gg += vd * vd;
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g < G) {
        const double xd = x[g];
        dot[g] += xd * vd;
        sq[g] += xd * xd;
      }
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g < G) {
      const double s_dot = warp_sum(dot[g]);
      const double s_sq = warp_sum(sq[g]);
      if (lane == 0) {
        scratch[g * kWarps + warp] = s_dot;
        scratch[(G + g) * kWarps + warp] = s_sq;
      }
    }
  }
  gg = warp_sum(gg);
  if (lane == 0) scratch[2 * G * kWarps + warp] = gg;
  __syncthreads();
  const int k_total = 2 * G + 1;
  for (int k = threadIdx.x; k < k_total; k += blockDim.x) {
    double s = 0.0;
    for (int v = 0; v < kWarps; ++v) s += scratch[k * kWarps + v];
    partials[static_cast<int64_t>(blockIdx.x) * k_total + k] = s;
  }
}

// One block: adds the per-block partials in block order, then coef_g and residual_norm_g.
__global__ void __launch_bounds__(kThreads)
    gsa_project_finish_kernel(const double* __restrict__ partials, int blocks, int G, float* __restrict__ coef,
                              float* __restrict__ residual) {
  __shared__ double scratch[kWarps];
  __shared__ double totals[2 * kMaxGroups + 1];
  const int k_total = 2 * G + 1;
  for (int k = 0; k < k_total; ++k) {
    double s = 0.0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partials[static_cast<int64_t>(b) * k_total + k];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) totals[k] = s;
  }
  __syncthreads();
  const int g = threadIdx.x;
  if (g < G) {
    const double gg = totals[2 * G];
    const double c = gg > 0.0 ? totals[g] / gg : 0.0;
    coef[g] = static_cast<float>(c);
    residual[g] = static_cast<float>(sqrt(fmax(0.0, totals[G + g] - c * totals[g])));
  }
}

template <int MAXG>
void launch_gsa_project(const float* grads, const float* weights, float* global, double* partials, int blocks, int G,
                        int64_t d, cudaStream_t stream) {
  gsa_project_kernel<MAXG><<<blocks, kThreads, 0, stream>>>(grads, weights, global, partials, G, d);
}

std::tuple<at::Tensor, at::Tensor> gsa_project_cuda(const at::Tensor& grads, const at::Tensor& weights,
                                                     const at::Tensor& global) {
  check_gsa_project(grads, weights, global);
  TORCH_CHECK_VALUE(grads.scalar_type() == at::kFloat, "gsa_project: the CUDA kernel takes float32 only, got grads of ",
                    "dtype ", grads.scalar_type(), " (the float64 path runs on the CPU or with backend='reference')");
  const c10::cuda::CUDAGuard guard(grads.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int G = static_cast<int>(grads.size(0));
  const int64_t d = grads.size(1);
  const int blocks = grid_for(d);
  at::Tensor partials = at::empty({static_cast<int64_t>(blocks) * (2 * G + 1)}, grads.options().dtype(at::kDouble));
  at::Tensor coef = at::empty({G}, weights.options());
  at::Tensor residual = at::empty({G}, weights.options());
  const float* g_ptr = grads.const_data_ptr<float>();
  const float* w_ptr = weights.const_data_ptr<float>();
  float* out = global.mutable_data_ptr<float>();
  double* p_ptr = partials.mutable_data_ptr<double>();
  if (G <= 1) {
    launch_gsa_project<1>(g_ptr, w_ptr, out, p_ptr, blocks, G, d, stream);
  } else if (G <= 2) {
    launch_gsa_project<2>(g_ptr, w_ptr, out, p_ptr, blocks, G, d, stream);
  } else if (G <= 4) {
    launch_gsa_project<4>(g_ptr, w_ptr, out, p_ptr, blocks, G, d, stream);
  } else if (G <= 8) {
    launch_gsa_project<8>(g_ptr, w_ptr, out, p_ptr, blocks, G, d, stream);
  } else if (G <= 16) {
    launch_gsa_project<16>(g_ptr, w_ptr, out, p_ptr, blocks, G, d, stream);
  } else {
    launch_gsa_project<kMaxGroups>(g_ptr, w_ptr, out, p_ptr, blocks, G, d, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gsa_project_finish_kernel<<<1, kThreads, 0, stream>>>(p_ptr, blocks, G, coef.mutable_data_ptr<float>(),
                                                        residual.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {coef, residual};
}

// Per block: partials[block] = sum over its elements of sum_j coef_j F_ji (theta_i - a_ji)^2; grad (if not null)
// += 2 sum_j coef_j F_ji (theta_i - a_ji). anchors / fisher are read in their storage type (fp32, bf16 or fp16).
template <typename TA, typename TF>
__global__ void __launch_bounds__(kThreads)
    gkp_kernel(const float* __restrict__ theta, const TA* __restrict__ anchors, const TF* __restrict__ fisher,
               const float* __restrict__ coef, float* __restrict__ grad, double* __restrict__ partials, int G,
               int64_t d) {
  __shared__ float c[kMaxGroups];
  __shared__ double scratch[kWarps];
  if (threadIdx.x < G) c[threadIdx.x] = coef[threadIdx.x];
  __syncthreads();
  double value = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < d; i += stride) {
    const float t = theta[i];
    float gacc = 0.0f;
    float vacc = 0.0f;
#pragma unroll 4
    for (int j = 0; j < G; ++j) {
      const float diff = t - static_cast<float>(anchors[j * d + i]);
      const float cfd = c[j] * static_cast<float>(fisher[j * d + i]) * diff;
      gacc += cfd;
      vacc += cfd * diff;
    }
    if (grad != nullptr) grad[i] += 2.0f * gacc;
    value += vacc;
  }
  value = block_sum(value, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = value;
}

__global__ void __launch_bounds__(kThreads)
    gkp_finish_kernel(const double* __restrict__ partials, int blocks, float* __restrict__ out) {
  __shared__ double scratch[kWarps];
  double s = 0.0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partials[b];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = static_cast<float>(s);
}

at::Tensor gkp_cuda(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                    const at::Tensor& coef, const at::Tensor* grad_out) {
  check_gkp(theta, anchors, fisher, coef, grad_out);
  TORCH_CHECK_VALUE(theta.scalar_type() == at::kFloat, "gkp_penalty: the CUDA kernel takes float32 only, got theta of ",
                    "dtype ", theta.scalar_type(), " (the float64 path runs on the CPU or with backend='reference')");
  const c10::cuda::CUDAGuard guard(theta.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int G = static_cast<int>(anchors.size(0));
  const int64_t d = theta.size(0);
  const int blocks = grid_for(d);
  at::Tensor partials = at::empty({blocks}, theta.options().dtype(at::kDouble));
  at::Tensor value = at::empty({}, theta.options());
  float* grad = grad_out != nullptr ? grad_out->mutable_data_ptr<float>() : nullptr;
  dispatch_stored(anchors.scalar_type(), [&](auto a_tag) {
    using TA = decltype(a_tag);
    dispatch_stored(fisher.scalar_type(), [&](auto f_tag) {
      using TF = decltype(f_tag);
      gkp_kernel<TA, TF><<<blocks, kThreads, 0, stream>>>(
          theta.const_data_ptr<float>(), anchors.const_data_ptr<TA>(), fisher.const_data_ptr<TF>(),
          coef.const_data_ptr<float>(), grad, partials.mutable_data_ptr<double>(), G, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  gkp_finish_kernel<<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), blocks,
                                                value.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return value;
}

at::Tensor gkp_penalty_cuda(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                            const at::Tensor& coef) {
  return gkp_cuda(theta, anchors, fisher, coef, nullptr);
}

at::Tensor gkp_penalty_accumulate_cuda(const at::Tensor& theta, const at::Tensor& anchors, const at::Tensor& fisher,
                                       const at::Tensor& coef, const at::Tensor& grad_out) {
  return gkp_cuda(theta, anchors, fisher, coef, &grad_out);
}

}  // namespace
}  // namespace lt_recipes

TORCH_LIBRARY_IMPL(lt_recipes, CUDA, m) {
  m.impl("gsa_project", &lt_recipes::gsa_project_cuda);
  m.impl("gkp_penalty", &lt_recipes::gkp_penalty_cuda);
  m.impl("gkp_penalty_accumulate", &lt_recipes::gkp_penalty_accumulate_cuda);
}
