// memsafe fused ops: the C++ CPU implementation (OpenMP through at::parallel_for).
//
// The PyTorch reference of every op is in memsafe/ops.py; each function below follows its arithmetic step by step
// in float (the build passes -ffp-contract=off so no FMA changes a rounding), so results equal the reference bit
// for bit except the per-image norm, whose summation order differs (and is more accurate here: float products
// summed in double).
//
// Why a plain CPython module taking data pointers instead of a pybind11 module taking at::Tensor: it compiles in
// seconds instead of a minute (no torch/extension.h, no pybind11), which is what a user pays on first use and
// what CI pays on every run. The Python side (memsafe/ops.py) validates dtype, shape, device and contiguity and
// allocates the outputs; this file only computes. Pointers are passed as Python ints (Tensor.data_ptr()).
//
// Determinism: the per-image norm is summed over fixed chunks of kChunk elements with a fixed number of lanes,
// and the chunk sums are added in chunk order, so a norm is bit-identical whatever the thread count.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/version.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

#ifndef MEMSAFE_SOURCE_HASH
#define MEMSAFE_SOURCE_HASH unknown
#endif
#define MEMSAFE_STR2(x) #x
#define MEMSAFE_STR(x) MEMSAFE_STR2(x)
#define MEMSAFE_CAT2(a, b) a##b
#define MEMSAFE_CAT(a, b) MEMSAFE_CAT2(a, b)

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define MEMSAFE_F16C 1
#endif

namespace {

constexpr int64_t kChunk = 8192;          // elements per task; fixed, so the reduction order is fixed
constexpr int kLanes = 16;                // independent accumulators (lets the compiler vectorize the sum)
constexpr int64_t kBlock = 512;           // elements converted to float at a time (a multiple of kLanes)
constexpr int64_t kElementGrain = 32768;  // elementwise ops: fewer elements than this stay on one thread
static_assert(kChunk % kBlock == 0 && kBlock % kLanes == 0, "lanes must not depend on block boundaries");

// dtype codes shared with memsafe/ops.py (_CPU_DTYPE_CODES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// -- element conversion in blocks ------------------------------------------------------------------------------------
// The hot loops work on float blocks. float needs no conversion; bfloat16 converts with shifts the compiler
// vectorizes; float16 uses the CPU's F16C instructions where present (checked at run time, so one binary serves
// every x86-64 CPU), because c10::Half's portable conversion is scalar and about 10x slower. Both round to
// nearest even, as torch does.
#ifdef MEMSAFE_F16C
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* in, float* out, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(in);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(bits[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* in, c10::Half* out, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(out);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bits + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) bits[i] = _cvtss_sh(in[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

const bool kHasF16C = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}();
#endif

template <typename T>
struct Block {
  // Floats of in[0, n): `in` itself for float, else converted into `buffer`.
  static const float* load(const T* in, float* buffer, int64_t n) {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(in[i]);
    return buffer;
  }
  static void store(const float* in, T* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
  }
};

template <>
struct Block<float> {
  static const float* load(const float* in, float*, int64_t) { return in; }
  static void store(const float* in, float* out, int64_t n) {
    if (in != out) std::copy(in, in + n, out);
  }
};

template <>
struct Block<c10::Half> {
  static const float* load(const c10::Half* in, float* buffer, int64_t n) {
#ifdef MEMSAFE_F16C
    if (kHasF16C) {
      half_to_float_f16c(in, buffer, n);
      return buffer;
    }
#endif
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(in[i]);
    return buffer;
  }
  static void store(const float* in, c10::Half* out, int64_t n) {
#ifdef MEMSAFE_F16C
    if (kHasF16C) {
      float_to_half_f16c(in, out, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<c10::Half>(in[i]);
  }
};

// acc[j] += x[i]^2 for the elements i = j (mod kLanes), products and sums in double.
inline void add_squares(const float* x, int64_t n, double* acc) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(x[i + j]) * static_cast<double>(x[i + j]);
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
}

// -- op 1 ------------------------------------------------------------------------------------------------------------
// Pass 1 over one chunk: d = a - b (rounded to T), stored; returns sum(float(d)^2) accumulated in double.
template <typename T>
double diff_sumsq_chunk(const T* a, const T* b, T* d, int64_t len) {
  alignas(64) float fa[kBlock], fb[kBlock], fd[kBlock];
  double acc[kLanes] = {};
  for (int64_t off = 0; off < len; off += kBlock) {
    const int64_t n = std::min(kBlock, len - off);
    const float* pa = Block<T>::load(a + off, fa, n);
    const float* pb = Block<T>::load(b + off, fb, n);
    float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(d + off) : fd;
    for (int64_t i = 0; i < n; ++i) out[i] = pa[i] - pb[i];
    Block<T>::store(out, d + off, n);
    // The norm is of the stored (rounded) difference, as the reference computes it.
    add_squares(Block<T>::load(d + off, fa, n), n, acc);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {  // fixed pairwise tree over the lanes
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return acc[0];
}

// Pass 2 over one chunk: out = float(d) * scale.
template <typename T>
void scale_chunk(const T* d, float* out, float scale, int64_t len) {
  alignas(64) float fd[kBlock];
  for (int64_t off = 0; off < len; off += kBlock) {
    const int64_t n = std::min(kBlock, len - off);
    const float* x = Block<T>::load(d + off, fd, n);
    for (int64_t i = 0; i < n; ++i) out[off + i] = x[i] * scale;
  }
}

template <typename T>
void diff_norm_impl(const T* a, const T* b, T* diff, float* norms, float* probe, float* seed, const bool* active,
                    int64_t images, int64_t n, float rho) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t tasks = images * chunks;
  std::vector<double> partial(static_cast<size_t>(tasks));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = (t % chunks) * kChunk;
      const int64_t offset = (t / chunks) * n + lo;
      partial[t] = diff_sumsq_chunk(a + offset, b + offset, diff + offset, std::min(kChunk, n - lo));
    }
  });
  std::vector<float> probe_scale(static_cast<size_t>(images)), seed_scale(static_cast<size_t>(images));
  for (int64_t i = 0; i < images; ++i) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[i * chunks + c];
    const float norm = static_cast<float>(std::sqrt(total));
    norms[i] = norm;
    // As the reference: 1 / max(norm, FLT_MIN) where norm > 0, else 0 (no direction: probe and seed are zero).
    const float inv = norm > 0.0f ? 1.0f / std::max(norm, FLT_MIN) : 0.0f;
    probe_scale[i] = inv * rho;
    seed_scale[i] = (active == nullptr || active[i]) ? inv : 0.0f;
  }
  if (probe == nullptr && seed == nullptr) return;
  // Pass 2 over the stored difference (read back in T, as the reference normalizes diff.float()).
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / chunks;
      const int64_t lo = (t % chunks) * kChunk;
      const int64_t offset = image * n + lo;
      const int64_t len = std::min(kChunk, n - lo);
      if (probe != nullptr) scale_chunk(diff + offset, probe + offset, probe_scale[image], len);
      if (seed != nullptr) scale_chunk(diff + offset, seed + offset, seed_scale[image], len);
    }
  });
}

// -- op 2 ------------------------------------------------------------------------------------------------------------
template <typename T>
void batchwise_update_impl(float* z, const T* diff_probe, const T* diff, int64_t total, float gamma) {
  at::parallel_for(0, total, kElementGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float fp[kBlock], fd[kBlock];
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      const float* p = Block<T>::load(diff_probe + off, fp, n);
      const float* d = Block<T>::load(diff + off, fd, n);
      float* zo = z + off;
      for (int64_t i = 0; i < n; ++i) zo[i] = zo[i] - (p[i] - d[i]) * gamma;
    }
  });
}

// -- op 3 ------------------------------------------------------------------------------------------------------------
void adamw_impl(float* z, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t* step, const bool* active,
                int64_t images, int64_t n, double lr, double weight_decay, double beta1, double beta2,
                double eps) {
  // Per-image scalars exactly as the reference forms them: bias corrections in double from the image's own
  // step count, rounded to float; lr / bias1 as reciprocal(bias1) * lr (torch's `scalar / tensor`).
  std::vector<float> step_size(static_cast<size_t>(images)), bias2_sqrt(static_cast<size_t>(images));
  for (int64_t i = 0; i < images; ++i) {
    const int64_t s = step[i] + (active[i] ? 1 : 0);
    const double t = static_cast<double>(std::max<int64_t>(s, 1));
    const float bias1 = static_cast<float>(1.0 - std::pow(beta1, t));
    bias2_sqrt[i] = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
    step_size[i] = (1.0f / bias1) * static_cast<float>(lr);
  }
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = static_cast<float>(1.0 - beta1), c2 = static_cast<float>(1.0 - beta2);
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float e = static_cast<float>(eps);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, images * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / chunks;
      if (!active[image]) continue;  // inactive images: not a byte read or written
      const int64_t lo = (t % chunks) * kChunk;
      const int64_t offset = image * n + lo;
      const int64_t len = std::min(kChunk, n - lo);
      const float ss = step_size[image], b2s = bias2_sqrt[image];
      float* zi = z + offset;
      const float* gi = grad + offset;
      float* mi = exp_avg + offset;
      float* vi = exp_avg_sq + offset;
      for (int64_t i = 0; i < len; ++i) {
        const float g = gi[i];
        const float m = mi[i] * b1 + g * c1;
        const float v = vi[i] * b2 + (g * g) * c2;
        const float denom = std::sqrt(v) / b2s + e;
        zi[i] = zi[i] * decay - (ss * m) / denom;
        mi[i] = m;
        vi[i] = v;
      }
    }
  });
  for (int64_t i = 0; i < images; ++i) step[i] += active[i] ? 1 : 0;
}

// -- op 4 ------------------------------------------------------------------------------------------------------------
void stop_test_impl(const float* norms, const int64_t* step, const bool* active, bool* keep, int64_t images,
                    float target, int64_t max_iterations) {
  for (int64_t i = 0; i < images; ++i) keep[i] = active[i] && norms[i] > target && step[i] < max_iterations;
}

// -- Python glue -----------------------------------------------------------------------------------------------------
template <typename P>
P* ptr(unsigned long long address) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(address));
}

// Runs `body` without the GIL (other WebUI threads keep running) and turns a C++ exception into a Python one.
template <typename F>
PyObject* run_released(F&& body) {
  std::string error;
  Py_BEGIN_ALLOW_THREADS;
  try {
    body();
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown C++ exception";
  } catch (...) {
    error = "unknown C++ exception";
  }
  Py_END_ALLOW_THREADS;
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, ("memsafe_ops_cpp: " + error).c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* bad_dtype(int dtype) {
  PyErr_Format(PyExc_ValueError, "memsafe_ops_cpp: unknown dtype code %d (0 float32, 1 float16, 2 bfloat16)", dtype);
  return nullptr;
}

bool bad_sizes(long long images, long long n) {
  if (images < 0 || n < 0) {
    PyErr_SetString(PyExc_ValueError, "memsafe_ops_cpp: negative size");
    return true;
  }
  return false;
}

const char kDiffNormDoc[] =
    "diff_norm(dtype, a, b, diff, norms, probe, seed, active, images, n, rho) -> None\n"
    "diff = a - b; norms[i] = ||diff_i|| (float32); probe = rho*diff/||diff|| and seed = diff/||diff|| (0 for\n"
    "inactive images) when their pointers are non-zero. active == 0 means all images active.";

PyObject* py_diff_norm(PyObject*, PyObject* args) {
  int dtype;
  unsigned long long a, b, diff, norms, probe, seed, active;
  long long images, n;
  double rho;
  if (!PyArg_ParseTuple(args, "iKKKKKKKLLd", &dtype, &a, &b, &diff, &norms, &probe, &seed, &active, &images, &n,
                        &rho))
    return nullptr;
  if (bad_sizes(images, n)) return nullptr;
  const float r = static_cast<float>(rho);
  switch (dtype) {
    case kFloat32:
      return run_released([&] {
        diff_norm_impl(ptr<const float>(a), ptr<const float>(b), ptr<float>(diff), ptr<float>(norms),
                       ptr<float>(probe), ptr<float>(seed), ptr<const bool>(active), images, n, r);
      });
    case kFloat16:
      return run_released([&] {
        diff_norm_impl(ptr<const c10::Half>(a), ptr<const c10::Half>(b), ptr<c10::Half>(diff), ptr<float>(norms),
                       ptr<float>(probe), ptr<float>(seed), ptr<const bool>(active), images, n, r);
      });
    case kBFloat16:
      return run_released([&] {
        diff_norm_impl(ptr<const c10::BFloat16>(a), ptr<const c10::BFloat16>(b), ptr<c10::BFloat16>(diff),
                       ptr<float>(norms), ptr<float>(probe), ptr<float>(seed), ptr<const bool>(active), images, n,
                       r);
      });
    default:
      return bad_dtype(dtype);
  }
}

const char kBatchwiseDoc[] =
    "batchwise_update(dtype, z, diff_probe, diff, total, gamma) -> None\n"
    "z (float32) -= gamma * (diff_probe - diff), in place; dtype is that of diff_probe and diff.";

PyObject* py_batchwise_update(PyObject*, PyObject* args) {
  int dtype;
  unsigned long long z, diff_probe, diff;
  long long total;
  double gamma;
  if (!PyArg_ParseTuple(args, "iKKKLd", &dtype, &z, &diff_probe, &diff, &total, &gamma)) return nullptr;
  if (bad_sizes(total, 0)) return nullptr;
  const float g = static_cast<float>(gamma);
  switch (dtype) {
    case kFloat32:
      return run_released(
          [&] { batchwise_update_impl(ptr<float>(z), ptr<const float>(diff_probe), ptr<const float>(diff), total, g); });
    case kFloat16:
      return run_released([&] {
        batchwise_update_impl(ptr<float>(z), ptr<const c10::Half>(diff_probe), ptr<const c10::Half>(diff), total, g);
      });
    case kBFloat16:
      return run_released([&] {
        batchwise_update_impl(ptr<float>(z), ptr<const c10::BFloat16>(diff_probe), ptr<const c10::BFloat16>(diff),
                              total, g);
      });
    default:
      return bad_dtype(dtype);
  }
}

const char kAdamWDoc[] =
    "adamw_step(z, grad, exp_avg, exp_avg_sq, step, active, images, n, lr, weight_decay, beta1, beta2, eps)\n"
    "One AdamW step per active image, in place (float32 tensors, int64 step, bool active).";

PyObject* py_adamw_step(PyObject*, PyObject* args) {
  unsigned long long z, grad, exp_avg, exp_avg_sq, step, active;
  long long images, n;
  double lr, weight_decay, beta1, beta2, eps;
  if (!PyArg_ParseTuple(args, "KKKKKKLLddddd", &z, &grad, &exp_avg, &exp_avg_sq, &step, &active, &images, &n, &lr,
                        &weight_decay, &beta1, &beta2, &eps))
    return nullptr;
  if (bad_sizes(images, n)) return nullptr;
  return run_released([&] {
    adamw_impl(ptr<float>(z), ptr<const float>(grad), ptr<float>(exp_avg), ptr<float>(exp_avg_sq),
               ptr<int64_t>(step), ptr<const bool>(active), images, n, lr, weight_decay, beta1, beta2, eps);
  });
}

const char kStopTestDoc[] =
    "stop_test(norms, step, active, keep, images, target, max_iterations) -> None\n"
    "keep = active & (norms > target) & (step < max_iterations).";

PyObject* py_stop_test(PyObject*, PyObject* args) {
  unsigned long long norms, step, active, keep;
  long long images, max_iterations;
  double target;
  if (!PyArg_ParseTuple(args, "KKKKLdL", &norms, &step, &active, &keep, &images, &target, &max_iterations))
    return nullptr;
  if (bad_sizes(images, 0)) return nullptr;
  // Same comparison as torch: the Python float target is rounded to float32 first.
  stop_test_impl(ptr<const float>(norms), ptr<const int64_t>(step), ptr<const bool>(active), ptr<bool>(keep),
                 images, static_cast<float>(target), max_iterations);
  Py_RETURN_NONE;
}

PyObject* py_build_info(PyObject*, PyObject*) {
#ifdef _OPENMP
  const int openmp = 1;
#else
  const int openmp = 0;
#endif
  return Py_BuildValue("{s:s,s:s,s:i,s:i}", "source_hash", MEMSAFE_STR(MEMSAFE_SOURCE_HASH), "torch_version",
                       MEMSAFE_STR(TORCH_VERSION_MAJOR) "." MEMSAFE_STR(TORCH_VERSION_MINOR) "." MEMSAFE_STR(
                           TORCH_VERSION_PATCH),
                       "openmp", openmp, "chunk", static_cast<int>(kChunk));
}

PyMethodDef kMethods[] = {
    {"diff_norm", py_diff_norm, METH_VARARGS, kDiffNormDoc},
    {"batchwise_update", py_batchwise_update, METH_VARARGS, kBatchwiseDoc},
    {"adamw_step", py_adamw_step, METH_VARARGS, kAdamWDoc},
    {"stop_test", py_stop_test, METH_VARARGS, kStopTestDoc},
    {"build_info", py_build_info, METH_NOARGS, "What this binary was built from: source hash, torch version."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    MEMSAFE_STR(TORCH_EXTENSION_NAME),
    "memsafe fused ops, C++ CPU implementation (see csrc/memsafe_ops_cpu.cpp)",
    -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC MEMSAFE_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
