// memsafe fused ops: the CUDA binding. Validates tensors (device, dtype, shape, contiguity), allocates outputs,
// and calls the torch-free launchers of memsafe_kernels.cuh on the current stream of the tensors' device.
// The Python module itself is defined in memsafe_ops_cuda_module.cpp (pybind11 stays out of nvcc).
// Light headers on purpose: ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers, which some toolkits
// (and some of our users' installs) lack, for nothing we use. c10::cuda::getCurrentCUDAStream is the function
// at::cuda::getCurrentCUDAStream names.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "memsafe_kernels.cuh"
#include "memsafe_ops_cuda.h"

namespace memsafe {
namespace {

namespace k = memsafe::cuda;

// Calls f(T*) with the kernel element type of `dtype` (at::Half and __half share their layout, as do
// at::BFloat16 and __nv_bfloat16).
template <typename F>
void dispatch_elem(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "memsafe_ops_cuda.", op, ": unsupported dtype ", dtype, " (float32, float16, bfloat16)");
  }
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "memsafe_ops_cuda.", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "memsafe_ops_cuda.", op, ": ", name, " is on ", t.device(),
              ", expected ", ref.device());
}

void check_per_image(const at::Tensor& t, const at::Tensor& ref, int64_t images, at::ScalarType dtype,
                     const char* op, const char* name) {
  check_on(t, ref, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, "memsafe_ops_cuda.", op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == images, "memsafe_ops_cuda.", op, ": ", name, " must have shape [",
              images, "], got ", t.sizes());
}

// A caller's output buffer (checked: device, dtype, shape, contiguity), or a new tensor when none was given.
at::Tensor output(const std::optional<at::Tensor>& given, at::IntArrayRef sizes, at::ScalarType dtype,
                  const at::Tensor& ref, const char* op, const char* name) {
  if (!given.has_value() || !given->defined()) return at::empty(sizes, ref.options().dtype(dtype));
  check_on(*given, ref, op, name);
  TORCH_CHECK(given->scalar_type() == dtype && given->sizes() == sizes && given->is_contiguous(),
              "memsafe_ops_cuda.", op, ": ", name, " must be a contiguous ", dtype, " tensor of shape ", sizes,
              ", got ", given->scalar_type(), " ", given->sizes());
  return *given;
}

void check_chunks(int64_t images, int64_t n, const char* op) {
  TORCH_CHECK(images * static_cast<int64_t>(k::chunks_per_image(n)) < INT_MAX, "memsafe_ops_cuda.", op,
              ": tensor too large for one launch (", images, " images of ", n, " elements)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> diff_norm_cuda(const at::Tensor& eps_cond,
                                                                        const at::Tensor& eps_uncond,
                                                                        std::optional<double> rho,
                                                                        const std::optional<at::Tensor>& active,
                                                                        const std::optional<at::Tensor>& out_diff,
                                                                        const std::optional<at::Tensor>& out_norms,
                                                                        const std::optional<at::Tensor>& out_probe,
                                                                        const std::optional<at::Tensor>& out_seed) {
  const char* op = "diff_norm";
  check_on(eps_cond, eps_cond, op, "eps_cond");
  check_on(eps_uncond, eps_cond, op, "eps_uncond");
  TORCH_CHECK(eps_cond.scalar_type() == eps_uncond.scalar_type(), "memsafe_ops_cuda.diff_norm: dtypes differ (",
              eps_cond.scalar_type(), " vs ", eps_uncond.scalar_type(), ")");
  TORCH_CHECK(eps_cond.sizes() == eps_uncond.sizes(), "memsafe_ops_cuda.diff_norm: shapes differ (",
              eps_cond.sizes(), " vs ", eps_uncond.sizes(), ")");
  TORCH_CHECK(eps_cond.dim() >= 1, "memsafe_ops_cuda.diff_norm: inputs need a batch dimension");
  const c10::cuda::CUDAGuard guard(eps_cond.device());
  const at::Tensor a = eps_cond.contiguous();
  const at::Tensor b = eps_uncond.contiguous();
  const int64_t images = a.size(0);
  const int64_t n = images > 0 ? a.numel() / images : 0;
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor diff = output(out_diff, a.sizes(), a.scalar_type(), a, op, "out diff");
  at::Tensor norms = output(out_norms, {images}, at::kFloat, a, op, "out norms");
  at::Tensor probe = rho.has_value() ? output(out_probe, a.sizes(), at::kFloat, a, op, "out probe") : at::Tensor();
  at::Tensor seed = active.has_value() ? output(out_seed, a.sizes(), at::kFloat, a, op, "out seed") : at::Tensor();
  at::Tensor mask;
  if (active.has_value()) {
    check_per_image(*active, a, images, at::kBool, op, "active");
    mask = active->contiguous();
  }
  if (images == 0) return {diff, norms, probe, seed};
  if (n == 0) {  // empty images: norm 0, nothing else to write
    norms.zero_();
    return {diff, norms, probe, seed};
  }
  check_chunks(images, n, op);
  at::Tensor workspace = at::empty({k::diff_norm_workspace(images, n)}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(a.scalar_type(), op, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(k::launch_diff_norm<T>(
        reinterpret_cast<const T*>(a.const_data_ptr()), reinterpret_cast<const T*>(b.const_data_ptr()),
        reinterpret_cast<T*>(diff.mutable_data_ptr()), norms.mutable_data_ptr<float>(),
        probe.defined() ? probe.mutable_data_ptr<float>() : nullptr,
        seed.defined() ? seed.mutable_data_ptr<float>() : nullptr,
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, static_cast<float>(rho.value_or(0.0)),
        workspace.mutable_data_ptr<float>(), images, n, stream));
  });
  return {diff, norms, probe, seed};
}

void batchwise_update_cuda(at::Tensor& z, const at::Tensor& diff_probe, const at::Tensor& diff, double gamma) {
  const char* op = "batchwise_update";
  check_on(z, z, op, "z");
  check_on(diff_probe, z, op, "diff_probe");
  check_on(diff, z, op, "diff");
  TORCH_CHECK(z.scalar_type() == at::kFloat, "memsafe_ops_cuda.batchwise_update: z must be float32, got ",
              z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "memsafe_ops_cuda.batchwise_update: z must be contiguous (updated in place)");
  TORCH_CHECK(diff_probe.scalar_type() == diff.scalar_type(),
              "memsafe_ops_cuda.batchwise_update: diff_probe and diff dtypes differ");
  TORCH_CHECK(diff_probe.sizes() == z.sizes() && diff.sizes() == z.sizes(),
              "memsafe_ops_cuda.batchwise_update: shapes differ");
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor dp = diff_probe.contiguous();
  const at::Tensor d = diff.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(d.scalar_type(), op, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(k::launch_batchwise_update<T>(z.mutable_data_ptr<float>(),
                                                 reinterpret_cast<const T*>(dp.const_data_ptr()),
                                                 reinterpret_cast<const T*>(d.const_data_ptr()),
                                                 static_cast<float>(gamma), z.numel(), stream));
  });
}

void adamw_step_cuda(at::Tensor& z, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     at::Tensor& step, const at::Tensor& active, double lr, double weight_decay, double beta1,
                     double beta2, double eps) {
  const char* op = "adamw_step";
  check_on(z, z, op, "z");
  TORCH_CHECK(z.dim() >= 1, "memsafe_ops_cuda.adamw_step: z needs a batch dimension");
  const int64_t images = z.size(0);
  const at::Tensor* state[] = {&z, &grad, &exp_avg, &exp_avg_sq};
  const char* names[] = {"z", "grad", "exp_avg", "exp_avg_sq"};
  for (int i = 0; i < 4; ++i) {
    check_on(*state[i], z, op, names[i]);
    TORCH_CHECK(state[i]->scalar_type() == at::kFloat, "memsafe_ops_cuda.adamw_step: ", names[i],
                " must be float32, got ", state[i]->scalar_type());
    TORCH_CHECK(state[i]->sizes() == z.sizes(), "memsafe_ops_cuda.adamw_step: ", names[i], " has shape ",
                state[i]->sizes(), ", expected ", z.sizes());
    // grad is only read (made contiguous below); the others are updated in place
    TORCH_CHECK(i == 1 || state[i]->is_contiguous(), "memsafe_ops_cuda.adamw_step: ", names[i],
                " must be contiguous (updated in place)");
  }
  check_per_image(step, z, images, at::kLong, op, "step");
  check_per_image(active, z, images, at::kBool, op, "active");
  TORCH_CHECK(step.is_contiguous(), "memsafe_ops_cuda.adamw_step: step must be contiguous (updated in place)");
  if (images == 0) return;
  const int64_t n = z.numel() / images;
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor g = grad.contiguous();
  const at::Tensor mask = active.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n == 0) {  // nothing to update but the step counts
    C10_CUDA_CHECK(k::launch_adamw(nullptr, nullptr, nullptr, nullptr, step.mutable_data_ptr<int64_t>(),
                                   mask.const_data_ptr<bool>(), k::AdamWParams{lr, weight_decay, beta1, beta2, eps},
                                   images, 0, stream));
    return;
  }
  check_chunks(images, n, op);
  C10_CUDA_CHECK(k::launch_adamw(z.mutable_data_ptr<float>(), g.const_data_ptr<float>(),
                                 exp_avg.mutable_data_ptr<float>(), exp_avg_sq.mutable_data_ptr<float>(),
                                 step.mutable_data_ptr<int64_t>(), mask.const_data_ptr<bool>(),
                                 k::AdamWParams{lr, weight_decay, beta1, beta2, eps}, images, n, stream));
}

at::Tensor stop_test_cuda(const at::Tensor& norms, const at::Tensor& step, const at::Tensor& active, double target,
                          int64_t max_iterations) {
  const char* op = "stop_test";
  check_on(norms, norms, op, "norms");
  TORCH_CHECK(norms.dim() == 1, "memsafe_ops_cuda.stop_test: norms must have shape [B]");
  const int64_t images = norms.size(0);
  check_per_image(norms, norms, images, at::kFloat, op, "norms");
  check_per_image(step, norms, images, at::kLong, op, "step");
  check_per_image(active, norms, images, at::kBool, op, "active");
  const c10::cuda::CUDAGuard guard(norms.device());
  at::Tensor keep = at::empty({images}, norms.options().dtype(at::kBool));
  if (images == 0) return keep;
  const at::Tensor nc = norms.contiguous(), sc = step.contiguous(), ac = active.contiguous();
  // Same comparison as torch: the Python float target is rounded to float32 first.
  C10_CUDA_CHECK(k::launch_stop_test(nc.const_data_ptr<float>(), sc.const_data_ptr<int64_t>(),
                                     ac.const_data_ptr<bool>(), keep.mutable_data_ptr<bool>(),
                                     static_cast<float>(target), max_iterations, images,
                                     c10::cuda::getCurrentCUDAStream()));
  return keep;
}

}  // namespace memsafe
