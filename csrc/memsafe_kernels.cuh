// memsafe fused ops: CUDA kernels and their launchers.
//
// This header includes NO torch header on purpose: plain `nvcc -c` can compile-check it (tests/test_ops.py does,
// for sm_80 and sm_90), and the torch binding (memsafe_ops_cuda.cu) only validates tensors and calls the
// launchers below. The PyTorch reference of every op is in memsafe/ops.py; these kernels follow its arithmetic
// step by step (same roundings, explicit _rn intrinsics where nvcc would otherwise contract to FMA), so results
// match the reference to the last bit except the per-image norm, whose summation order differs.
//
// Layout: every tensor is contiguous, viewed as [images, n] (n = elements per image). Element types T: float,
// __half, __nv_bfloat16; all arithmetic and accumulation is in float.
//
// Determinism: the per-image norm is a fixed-shape reduction (each block sums a fixed chunk with a fixed
// warp-shuffle tree, then every consumer sums the chunk partials in the same fixed order). No float atomics, so
// a norm is bit-identical run to run and does not depend on how the hardware schedules blocks.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace memsafe {
namespace cuda {

constexpr int kThreads = 256;                       // threads per block, every kernel (launch bound)
constexpr int kWarps = kThreads / 32;
constexpr int kItemsPerThread = 8;                  // elements per thread in one chunk
constexpr int64_t kChunk = kThreads * kItemsPerThread;  // elements of ONE image handled by one block
constexpr int kMaxGrid = 1 << 30;                   // grid-stride loops never launch more blocks than this

// -- element conversions (float is the working type) ---------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float load(float x) { return x; }
  __device__ __forceinline__ static float store(float x) { return x; }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static float load(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Sum of `v` over the block, valid in thread 0. Fixed tree (shuffles, then the warp sums in warp order):
// the result depends only on the values, never on timing. Needs blockDim.x == kThreads.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum of the `chunks` partial sums of one image, in a fixed order, by warp 0 (valid in thread 0).
__device__ __forceinline__ float image_total(const float* partial, int chunks) {
  const int lane = threadIdx.x & 31;
  float v = 0.0f;
  for (int c = lane; c < chunks; c += 32) v += partial[c];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// -- op 1: diff = a - b and per-chunk sums of squares (pass 1) ------------------------------------------------
// Grid: images * chunks blocks; block (image, chunk) covers elements [chunk*kChunk, +kChunk) of the image.
template <typename T>
static __global__ void __launch_bounds__(kThreads)
    diff_sumsq_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ diff,
                      float* __restrict__ partial, int64_t n, int chunks) {
  __shared__ float warp_sums[kWarps];
  const int64_t image = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const int64_t base = image * n;
  float acc = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const T d = Elem<T>::store(__fsub_rn(Elem<T>::load(a[base + i]), Elem<T>::load(b[base + i])));
    diff[base + i] = d;
    const float x = Elem<T>::load(d);  // the norm is of the stored (rounded) difference, as in the reference
    acc = __fmaf_rn(x, x, acc);
  }
  acc = block_sum(acc, warp_sums);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// -- op 1: norms, and the probe rho*d/||d|| and the seed d/||d|| (active images) (pass 2) ---------------------
// Grid: images * blocks_per_image blocks. blocks_per_image == chunks when probe or seed is written, else 1
// (norms only). Every block of an image recomputes the image's total from the partials in the same order, so
// all agree bit for bit; block 0 of the image writes the norm.
template <typename T>
static __global__ void __launch_bounds__(kThreads)
    normalize_kernel(const T* __restrict__ diff, const float* __restrict__ partial, float* __restrict__ norms,
                     float* __restrict__ probe, float* __restrict__ seed, const bool* __restrict__ active,
                     float rho, int64_t n, int chunks, int blocks_per_image) {
  __shared__ float s_norm;
  const int64_t image = blockIdx.x / blocks_per_image;
  const int64_t chunk = blockIdx.x % blocks_per_image;
  if (threadIdx.x < 32) {
    const float total = image_total(partial + image * chunks, chunks);
    if (threadIdx.x == 0) {
      s_norm = __fsqrt_rn(total);
      if (chunk == 0) norms[image] = s_norm;
    }
  }
  __syncthreads();
  if (probe == nullptr && seed == nullptr) return;
  const float norm = s_norm;
  // Reference: 1 / max(norm, FLT_MIN) where norm > 0, else 0 (no direction: probe and seed are zero).
  const float inv = norm > 0.0f ? __fdiv_rn(1.0f, fmaxf(norm, 1.17549435e-38f)) : 0.0f;
  const float probe_scale = __fmul_rn(inv, rho);
  const float seed_scale = (active == nullptr || active[image]) ? inv : 0.0f;
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const int64_t base = image * n;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float x = Elem<T>::load(diff[base + i]);
    if (probe != nullptr) probe[base + i] = __fmul_rn(x, probe_scale);
    if (seed != nullptr) seed[base + i] = __fmul_rn(x, seed_scale);
  }
}

// -- op 2: z -= gamma * (d_probe - d), in place -----------------------------------------------------------------
template <typename T>
static __global__ void __launch_bounds__(kThreads)
    batchwise_update_kernel(float* __restrict__ z, const T* __restrict__ diff_probe, const T* __restrict__ diff,
                            float gamma, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const float step = __fmul_rn(__fsub_rn(Elem<T>::load(diff_probe[i]), Elem<T>::load(diff[i])), gamma);
    z[i] = __fsub_rn(z[i], step);
  }
}

// -- op 3: masked per-image AdamW ---------------------------------------------------------------------------------
struct AdamWParams {
  double lr, weight_decay, beta1, beta2, eps;
};

// Grid: images * chunks blocks. Inactive images return at once: not a byte of them is read or written. The step
// counters are only READ here (t = step + 1); adamw_count_kernel increments them afterwards, because a block
// cannot know when the other blocks of its image have read the old count.
static __global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* __restrict__ z, const float* __restrict__ grad, float* __restrict__ exp_avg,
                 float* __restrict__ exp_avg_sq, const int64_t* __restrict__ step, const bool* __restrict__ active,
                 AdamWParams p, int64_t n, int chunks) {
  __shared__ float s_step_size, s_bias2_sqrt;
  const int64_t image = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  if (!active[image]) return;
  if (threadIdx.x == 0) {
    // As the reference: bias corrections in double from the image's own step count, then rounded to float;
    // lr / bias1 evaluated as reciprocal(bias1) * lr, which is what torch does for `scalar / tensor`.
    const int64_t s = step[image] + 1;
    const double t = static_cast<double>(s < 1 ? 1 : s);
    const float bias1 = static_cast<float>(1.0 - pow(p.beta1, t));
    s_bias2_sqrt = static_cast<float>(sqrt(1.0 - pow(p.beta2, t)));
    s_step_size = __fmul_rn(__fdiv_rn(1.0f, bias1), static_cast<float>(p.lr));
  }
  __syncthreads();
  const float step_size = s_step_size;
  const float bias2_sqrt = s_bias2_sqrt;
  const float beta1 = static_cast<float>(p.beta1);
  const float beta2 = static_cast<float>(p.beta2);
  const float one_minus_beta1 = static_cast<float>(1.0 - p.beta1);
  const float one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  const float decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  const float eps = static_cast<float>(p.eps);
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  const int64_t base = image * n;
  for (int64_t i = base + begin + threadIdx.x; i < base + end; i += kThreads) {
    const float g = grad[i];
    const float m = __fadd_rn(__fmul_rn(exp_avg[i], beta1), __fmul_rn(g, one_minus_beta1));
    const float v = __fadd_rn(__fmul_rn(exp_avg_sq[i], beta2), __fmul_rn(__fmul_rn(g, g), one_minus_beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bias2_sqrt), eps);
    z[i] = __fsub_rn(__fmul_rn(z[i], decay), __fdiv_rn(__fmul_rn(step_size, m), denom));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

static __global__ void __launch_bounds__(kThreads)
    adamw_count_kernel(int64_t* __restrict__ step, const bool* __restrict__ active, int64_t images) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < images;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (active[i]) step[i] += 1;
  }
}

// -- op 4: stop test: keep = active & (norm > target) & (step < max_iterations) --------------------------------------
static __global__ void __launch_bounds__(kThreads)
    stop_test_kernel(const float* __restrict__ norms, const int64_t* __restrict__ step,
                     const bool* __restrict__ active, bool* __restrict__ keep, float target,
                     int64_t max_iterations, int64_t images) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < images;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    keep[i] = active[i] && norms[i] > target && step[i] < max_iterations;
  }
}

// -- launchers (host side; torch-free) -----------------------------------------------------------------------------
inline int chunks_per_image(int64_t n) { return static_cast<int>((n + kChunk - 1) / kChunk); }

inline unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

// Scratch needed by launch_diff_norm, in floats: one partial sum per (image, chunk).
inline int64_t diff_norm_workspace(int64_t images, int64_t n) { return images * chunks_per_image(n); }

// Requires images >= 1, n >= 1 and images * chunks_per_image(n) < 2^31 (the binding checks). probe, seed and
// active may be null (not computed / all images active).
template <typename T>
cudaError_t launch_diff_norm(const T* a, const T* b, T* diff, float* norms, float* probe, float* seed,
                             const bool* active, float rho, float* workspace, int64_t images, int64_t n,
                             cudaStream_t stream) {
  const int chunks = chunks_per_image(n);
  const unsigned blocks = static_cast<unsigned>(images * chunks);
  diff_sumsq_kernel<T><<<blocks, kThreads, 0, stream>>>(a, b, diff, workspace, n, chunks);
  const bool elementwise = probe != nullptr || seed != nullptr;
  const int per_image = elementwise ? chunks : 1;
  normalize_kernel<T><<<static_cast<unsigned>(images * per_image), kThreads, 0, stream>>>(
      diff, workspace, norms, probe, seed, active, rho, n, chunks, per_image);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_batchwise_update(float* z, const T* diff_probe, const T* diff, float gamma, int64_t total,
                                    cudaStream_t stream) {
  batchwise_update_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(z, diff_probe, diff, gamma, total);
  return cudaGetLastError();
}

inline cudaError_t launch_adamw(float* z, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t* step,
                                const bool* active, AdamWParams p, int64_t images, int64_t n,
                                cudaStream_t stream) {
  const int chunks = chunks_per_image(n);
  if (chunks > 0) {  // empty images: only the step counts change
    adamw_kernel<<<static_cast<unsigned>(images * chunks), kThreads, 0, stream>>>(z, grad, exp_avg, exp_avg_sq,
                                                                                   step, active, p, n, chunks);
  }
  adamw_count_kernel<<<grid_for(images), kThreads, 0, stream>>>(step, active, images);
  return cudaGetLastError();
}

inline cudaError_t launch_stop_test(const float* norms, const int64_t* step, const bool* active, bool* keep,
                                    float target, int64_t max_iterations, int64_t images, cudaStream_t stream) {
  stop_test_kernel<<<grid_for(images), kThreads, 0, stream>>>(norms, step, active, keep, target, max_iterations,
                                                              images);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace memsafe
