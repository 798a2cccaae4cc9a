// memsafe fused ops: the CUDA entry points (defined in memsafe_ops_cuda.cu, exported to Python by
// memsafe_ops_cuda_module.cpp). Semantics: the PyTorch references in memsafe/ops.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace memsafe {

// (diff, norms, probe, seed): diff = eps_cond - eps_uncond (input dtype), norms [B] float32; probe
// rho * diff / ||diff|| when rho is given, seed diff / ||diff|| (0 for inactive images) when active is given;
// absent outputs are undefined tensors (None in Python). out_*: caller's buffers to write into (contiguous, exact
// dtype and shape), new tensors when absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> diff_norm_cuda(const at::Tensor& eps_cond,
                                                                        const at::Tensor& eps_uncond,
                                                                        std::optional<double> rho,
                                                                        const std::optional<at::Tensor>& active,
                                                                        const std::optional<at::Tensor>& out_diff,
                                                                        const std::optional<at::Tensor>& out_norms,
                                                                        const std::optional<at::Tensor>& out_probe,
                                                                        const std::optional<at::Tensor>& out_seed);

// z -= gamma * (diff_probe - diff), in place (z float32, contiguous).
void batchwise_update_cuda(at::Tensor& z, const at::Tensor& diff_probe, const at::Tensor& diff, double gamma);

// One AdamW step per active image, in place on z, exp_avg, exp_avg_sq and step.
void adamw_step_cuda(at::Tensor& z, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     at::Tensor& step, const at::Tensor& active, double lr, double weight_decay, double beta1,
                     double beta2, double eps);

// active & (norms > target) & (step < max_iterations), a new bool tensor.
at::Tensor stop_test_cuda(const at::Tensor& norms, const at::Tensor& step, const at::Tensor& active, double target,
                          int64_t max_iterations);

}  // namespace memsafe
