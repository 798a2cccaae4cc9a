// memsafe fused ops: the Python module of the CUDA build (pybind11, compiled by the host compiler; the kernels and
// their binding are in memsafe_ops_cuda.cu). torch's pybind11 casters for at::Tensor come from
// torch/csrc/utils/pybind.h: a third of the compile time of torch/extension.h, which adds the whole C++ frontend.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include <cuda_runtime_api.h>

#include "memsafe_ops_cuda.h"

#ifndef MEMSAFE_SOURCE_HASH
#define MEMSAFE_SOURCE_HASH unknown
#endif
#define MEMSAFE_STR2(x) #x
#define MEMSAFE_STR(x) MEMSAFE_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memsafe fused ops, CUDA implementation (see csrc/memsafe_kernels.cuh)";
  m.def("diff_norm", &memsafe::diff_norm_cuda, "(diff, norms, probe|None, seed|None) of eps_cond - eps_uncond",
        pybind11::arg("eps_cond"), pybind11::arg("eps_uncond"), pybind11::arg("rho") = pybind11::none(),
        pybind11::arg("active") = pybind11::none(), pybind11::arg("out_diff") = pybind11::none(),
        pybind11::arg("out_norms") = pybind11::none(), pybind11::arg("out_probe") = pybind11::none(),
        pybind11::arg("out_seed") = pybind11::none());
  m.def("batchwise_update", &memsafe::batchwise_update_cuda, "z -= gamma * (diff_probe - diff), in place",
        pybind11::arg("z"), pybind11::arg("diff_probe"), pybind11::arg("diff"), pybind11::arg("gamma"));
  m.def("adamw_step", &memsafe::adamw_step_cuda, "one AdamW step per active image, in place", pybind11::arg("z"),
        pybind11::arg("grad"), pybind11::arg("exp_avg"), pybind11::arg("exp_avg_sq"), pybind11::arg("step"),
        pybind11::arg("active"), pybind11::arg("lr"), pybind11::arg("weight_decay"), pybind11::arg("beta1"),
        pybind11::arg("beta2"), pybind11::arg("eps"));
  m.def("stop_test", &memsafe::stop_test_cuda, "active & (norms > target) & (step < max_iterations)",
        pybind11::arg("norms"), pybind11::arg("step"), pybind11::arg("active"), pybind11::arg("target"),
        pybind11::arg("max_iterations"));
  m.def("build_info", [] {
    pybind11::dict info;
    info["source_hash"] = MEMSAFE_STR(MEMSAFE_SOURCE_HASH);
    info["torch_version"] = MEMSAFE_STR(TORCH_VERSION_MAJOR) "." MEMSAFE_STR(TORCH_VERSION_MINOR) "." MEMSAFE_STR(
        TORCH_VERSION_PATCH);
    info["cuda_runtime"] = CUDART_VERSION;
    return info;
  });
}
