"""The fused ops (csrc/) against their PyTorch references (memsafe/ops.py), and the loader (memsafe/_backend.py).

Every comparison runs the PUBLIC op with the compiled backend forced (``MEMSAFE_OPS_BACKEND``), on random shapes
(batch 1..9, odd spatial sizes, 4 and 16 channels, images spanning several chunks), with outputs poisoned with
NaN (through ``out=``) so an element a kernel forgets to write fails, with masks where all, none or some images
are active, and with zero-norm images.

Tolerances. Outputs in the inputs' dtype (the difference) are computed with the reference's exact roundings:
compared within one unit of that dtype (fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3, relative). Outputs accumulated in
float32 (norms; probe and seed, which scale the difference by 1/norm) differ only by the summation order of the
norm: relative 1e-5 whatever the input dtype. The float32 updates (batch-wise, AdamW) follow the reference op by
op: relative 1e-6 (torch's vectorized sqrt is not always correctly rounded, so not bit-exact).

The C++ CPU build is required wherever a C++ compiler and ninja exist (CI): a failed build fails these tests.
CUDA cases run only where torch sees a GPU (they skip cleanly elsewhere); the CUDA header is compile-checked with
``nvcc -c`` for sm_80 and sm_90 wherever nvcc exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memsafe import MitigationConfig, _backend, adjust_noise, ops

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIFF_RTOL = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}
F32 = {"rtol": 1e-5, "atol": 1e-6}  # float32-accumulated outputs (atol scaled by the values' size where needed)
UPDATE = {"rtol": 1e-6, "atol": 1e-6}

CUDA_OK = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device")]),
]


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _fresh_loader_after_module():
    """Leave the process-wide loader as the other test files expect it: not loaded, auto mode."""
    _backend.reset()
    yield
    _backend.reset()


@pytest.fixture()
def device() -> str:
    """The device of a test that is not parametrized over devices."""
    return "cpu"


@pytest.fixture()
def fused(monkeypatch, device):
    """Force the compiled backend serving ``device`` (builds it on first use). Skips only where no C++
    toolchain exists at all; a failed build fails the test."""
    problem = _backend._toolchain_problem()
    if problem:
        pytest.skip(f"the extensions cannot be built here: {problem}")
    # Where the CUDA backend can be had, force it for CPU cases too (it loads the C++ extension as well), so the
    # session does not switch back and forth between loads.
    forced = "cuda" if CUDA_OK and _backend.find_cuda_home()[0] is not None else "cpp"
    if device == "cuda" and forced != "cuda":
        why = f"a CUDA device but no usable CUDA toolkit: {_backend.find_cuda_home()[1]}"
        if os.environ.get("MEMSAFE_REQUIRE_CUDA_BUILD") == "1":  # bench/gpu_check.sh
            pytest.fail(why)
        pytest.skip(why)
    monkeypatch.setenv(_backend.ENV_BACKEND, forced)
    state = _backend.peek()
    if state is None or state.requested != forced:
        _backend.reset()
    state = _backend.get()
    assert (state.cuda if device == "cuda" else state.cpu) is not None, state.reason
    return state


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    """A loader that has loaded nothing yet, with its cache under tmp_path unless a test says otherwise."""
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    _backend.reset()
    yield
    _backend.reset()


def random_cases(seed: int, count: int):
    """(batch, channels, height, width) with batch 1..9, 4 or 16 channels and odd sizes; the first case spans
    several chunks of both the CPU (8192) and the CUDA (2048) kernels."""
    gen = torch.Generator().manual_seed(seed)
    cases = [(int(torch.randint(1, 10, (1,), generator=gen)), 16, 45, 47)]
    for _ in range(count - 1):
        b = int(torch.randint(1, 10, (1,), generator=gen))
        c = (4, 16)[int(torch.randint(0, 2, (1,), generator=gen))]
        h, w = (int(torch.randint(0, 17, (1,), generator=gen)) * 2 + 1 for _ in range(2))
        cases.append((b, c, h, w))
    return cases


def masks(batch: int, gen: torch.Generator):
    some = torch.rand(batch, generator=gen) < 0.5
    some[0] = True
    if batch > 1:
        some[-1] = False
    return {
        "all": torch.ones(batch, dtype=torch.bool),
        "none": torch.zeros(batch, dtype=torch.bool),
        "some": some,
    }


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(got, want, **tol):
    torch.testing.assert_close(got, want, equal_nan=False, **tol)


# -- op 1: difference, norms, probe, seed -----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_diff_norm_matches_reference(fused, device, dtype):
    gen = torch.Generator().manual_seed(11)
    for b, c, h, w in random_cases(seed=1 + DTYPES.index(dtype), count=5):
        cond = (torch.randn(b, c, h, w, generator=gen) * 2).to(dtype).to(device)
        uncond = torch.randn(b, c, h, w, generator=gen).to(dtype).to(device)
        uncond[0] = cond[0]  # a zero-norm image
        for mask_name, mask in masks(b, gen).items():
            for rho, active in ((None, None), (50.0, None), (None, mask), (7.5, mask)):
                active_dev = None if active is None else active.to(device)
                want = ops.guidance_diff_norm_ref(cond, uncond, rho=rho, active=active_dev)
                out = ops.DiffNorm(
                    nan_like(cond.shape, dtype, device),
                    nan_like((b,), torch.float32, device),
                    nan_like(cond.shape, torch.float32, device) if rho is not None else None,
                    nan_like(cond.shape, torch.float32, device) if active is not None else None,
                )
                got = ops.guidance_diff_norm(cond, uncond, rho=rho, active=active_dev, out=out)
                where = f"{(b, c, h, w)} {dtype} mask={mask_name} rho={rho} active={active is not None}"
                assert got.diff is out.diff and got.norms is out.norms, where
                assert_close(got.diff, want.diff, rtol=DIFF_RTOL[dtype], atol=0.0, msg=where)
                scale = float(want.norms.max())
                assert_close(got.norms, want.norms, rtol=F32["rtol"], atol=F32["atol"] * scale, msg=where)
                assert float(got.norms[0]) == 0.0, where
                for name in ("probe", "seed"):
                    g, r = getattr(got, name), getattr(want, name)
                    assert (g is None) == (r is None), where
                    if g is not None:
                        assert_close(g, r, **F32, msg=f"{name} {where}")
                        assert torch.count_nonzero(g[0]) == 0, f"zero-norm image has a {name}: {where}"
                if got.seed is not None:
                    inactive = ~active_dev
                    assert torch.count_nonzero(got.seed[inactive]) == 0, where


@pytest.mark.parametrize("device", DEVICES)
def test_diff_norm_allocates_and_accepts_strided_inputs(fused, device):
    gen = torch.Generator().manual_seed(3)
    cond = torch.randn(3, 4, 9, 7, generator=gen).to(device).to(memory_format=torch.channels_last)
    uncond = torch.randn(3, 4, 7, 9, generator=gen).to(device).transpose(2, 3)
    active = torch.tensor([True, False, True], device=device)
    want = ops.guidance_diff_norm_ref(cond, uncond, rho=2.0, active=active)
    got = ops.guidance_diff_norm(cond, uncond, rho=2.0, active=active)
    for g, r in zip(got, want, strict=True):
        assert_close(g, r, **F32)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_is_deterministic_and_per_image(fused, device):
    """Fixed reduction order: bit-identical run to run, with any thread count, and an image's norm inside a batch
    is bit-identical to its norm alone (per-seed reproducibility)."""
    gen = torch.Generator().manual_seed(5)
    cond = torch.randn(7, 16, 45, 47, generator=gen).to(device)
    uncond = torch.randn(7, 16, 45, 47, generator=gen).to(device)
    first = ops.guidance_diff_norm(cond, uncond, rho=3.0).norms
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        again = ops.guidance_diff_norm(cond, uncond, rho=3.0).norms
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, again)
    for i in range(cond.shape[0]):
        alone = ops.guidance_diff_norm(cond[i : i + 1], uncond[i : i + 1]).norms
        assert torch.equal(alone[0], first[i]), i


def test_diff_norm_out_is_checked(fused):
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    bad = ops.DiffNorm(torch.empty(2, 4, 3, 3, dtype=torch.float16), torch.empty(2), None, None)
    with pytest.raises(ValueError, match="out.diff"):
        ops.guidance_diff_norm(cond, uncond, out=bad)
    missing = ops.DiffNorm(torch.empty(2, 4, 3, 3), torch.empty(2), None, None)
    with pytest.raises(ValueError, match="out.probe"):
        ops.guidance_diff_norm(cond, uncond, rho=1.0, out=missing)


def test_uncovered_inputs_fall_back_to_the_reference(fused):
    """float64, mixed dtypes, autograd and empty batches go to the reference: same results, gradients flow."""
    a, b = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(ops.guidance_diff_norm(a, b).norms, ops.guidance_diff_norm_ref(a, b).norms)
    mixed = ops.guidance_diff_norm(a.float(), b.half())
    assert mixed.diff.dtype == torch.float32
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    ops.guidance_diff_norm(x, torch.zeros(2, 4, 5, 5)).norms.sum().backward()
    assert x.grad is not None
    empty = ops.guidance_diff_norm(torch.zeros(0, 4, 2, 2), torch.zeros(0, 4, 2, 2), rho=1.0)
    assert empty.norms.shape == (0,)


# -- op 2: batch-wise update ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batchwise_update_matches_reference(fused, device, dtype):
    gen = torch.Generator().manual_seed(21)
    for b, c, h, w in random_cases(seed=7, count=4):
        z = torch.randn(b, c, h, w, generator=gen).to(device)
        d_probe = torch.randn(b, c, h, w, generator=gen).to(dtype).to(device)
        d = torch.randn(b, c, h, w, generator=gen).to(dtype).to(device)
        d[0] = d_probe[0]  # an image that does not move
        want = ops.batchwise_update_ref(z.clone(), d_probe, d, 0.7)
        got = z.clone()
        assert ops.batchwise_update_(got, d_probe, d, 0.7) is got
        assert_close(got, want, **UPDATE)
        assert torch.equal(got[0], z[0])


# -- op 3: masked per-image AdamW -------------------------------------------------------------------------------------
def _adam_state(b, c, h, w, gen, device):
    z = torch.randn(b, c, h, w, generator=gen).to(device)
    return z, torch.zeros_like(z), torch.zeros_like(z), torch.zeros(b, dtype=torch.long, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_matches_reference(fused, device):
    gen = torch.Generator().manual_seed(31)
    for b, c, h, w in random_cases(seed=9, count=4):
        want = _adam_state(b, c, h, w, gen, device)
        got = tuple(t.clone() for t in want)
        for step in range(6):
            mask = list(masks(b, gen).values())[step % 3].to(device)
            grad = torch.randn(b, c, h, w, generator=gen).to(device)
            before = tuple(t.clone() for t in got)
            ops.adamw_step_ref(*want[:1], grad, *want[1:], mask, lr=0.05, weight_decay=0.01)
            ops.adamw_step_(*got[:1], grad, *got[1:], mask, lr=0.05, weight_decay=0.01)
            for g, r, name in zip(got, want, ("z", "exp_avg", "exp_avg_sq"), strict=False):
                assert_close(g, r, **UPDATE, msg=f"{name} step {step} {(b, c, h, w)}")
            assert torch.equal(got[3], want[3])
            for g, old in zip(got, before, strict=True):  # inactive images: bit-identical
                assert torch.equal(g[~mask], old[~mask])


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_equals_torch_optim_per_image(fused, device):
    """Each image follows exactly what torch.optim.AdamW does to it alone, skipping the steps where it is
    inactive (per-image step counts and bias corrections)."""
    gen = torch.Generator().manual_seed(41)
    b, shape = 5, (4, 9, 11)
    lr, wd, betas, eps = 0.03, 0.01, (0.9, 0.999), 1e-8
    z, m, v, step = _adam_state(b, *shape, gen, device)
    alone = [torch.nn.Parameter(z[i : i + 1].clone()) for i in range(b)]
    optims = [torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False) for p in alone]
    for it in range(8):
        mask = torch.rand(b, generator=gen) < 0.7
        mask[it % b] = True
        grad = torch.randn(b, *shape, generator=gen).to(device)
        ops.adamw_step_(z, grad, m, v, step, mask.to(device), lr=lr, weight_decay=wd, beta1=betas[0], beta2=betas[1])
        for i in range(b):
            if mask[i]:
                alone[i].grad = grad[i : i + 1].clone()
                optims[i].step()
    for i in range(b):
        assert_close(z[i : i + 1], alone[i].detach(), rtol=1e-5, atol=1e-6, msg=f"image {i}")
        state = optims[i].state[alone[i]]
        assert int(step[i]) == int(state["step"])
        assert_close(m[i : i + 1], state["exp_avg"], rtol=1e-5, atol=1e-7)
        assert_close(v[i : i + 1], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


# -- op 4: stop test --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_stop_test_matches_reference(fused, device):
    gen = torch.Generator().manual_seed(51)
    for b in range(1, 10):
        norms = (torch.rand(b, generator=gen) * 2).to(device)
        norms[0] = 0.1  # exactly at the target (float32-rounded, as torch compares)
        if b > 2:
            norms[1] = float("nan")
        step = torch.randint(95, 102, (b,), generator=gen).to(device)
        for mask in masks(b, gen).values():
            mask = mask.to(device)
            want = ops.stop_test_ref(norms, step, mask, 0.1, 100)
            got = ops.stop_test(norms, step, mask, 0.1, 100)
            assert got.dtype == torch.bool and got.device == norms.device
            assert torch.equal(got, want)


# -- the ops inside the methods ---------------------------------------------------------------------------------------
def _toy_guidance(z: torch.Tensor) -> torch.Tensor:
    """A smooth per-image map standing in for eps_tilde (differentiable, image i depends on z_i only)."""
    return 0.08 * torch.tanh(1.3 * z + 0.2) + 0.02 * z.roll(1, dims=-1)


@pytest.mark.parametrize("method", ["per_sample", "batch_wise"])
def test_methods_agree_whichever_backend(monkeypatch, fresh, method):
    if _backend._toolchain_problem():
        pytest.skip("no C++ toolchain")
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(61))
    config = MitigationConfig(method=method, max_iterations=25, target=0.9, rho=20.0, iterations=3)
    results = {}
    for backend in ("reference", "cpp"):
        monkeypatch.setenv(_backend.ENV_BACKEND, backend)
        _backend.reset()
        results[backend] = adjust_noise(z, _toy_guidance, config)
        assert ops.backend_info()["backend"] == backend
    ref, cpp = results["reference"], results["cpp"]
    assert torch.equal(ref.iterations, cpp.iterations)
    assert_close(cpp.z, ref.z, rtol=1e-5, atol=1e-5)
    assert_close(cpp.norm_after, ref.norm_after, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ref.z, z)  # it did adjust


# -- the loader -------------------------------------------------------------------------------------------------------
def memsafe_records(caplog):
    return [r for r in caplog.records if r.name == "memsafe"]


def test_import_loads_nothing():
    """The WebUI start-up must not pay for the extension: importing memsafe builds and imports nothing."""
    code = (
        "import sys, memsafe, memsafe.ops as o\n"
        "assert 'memsafe_ops_cpp' not in sys.modules and 'torch.utils.cpp_extension' not in sys.modules\n"
        "info = o.backend_info()\n"
        "assert info['loaded'] is False and info['backend'] is None, info\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_forced_reference(monkeypatch, fresh, caplog):
    monkeypatch.setenv(_backend.ENV_BACKEND, "reference")
    caplog.set_level(logging.INFO, logger="memsafe")
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    for _ in range(3):
        got = ops.guidance_diff_norm(a, b, rho=1.0)
    want = ops.guidance_diff_norm_ref(a, b, rho=1.0)
    assert all(torch.equal(g, w) for g, w in zip(got[:3], want[:3], strict=True))
    info = ops.backend_info()
    assert info["backend"] == "reference" and info["cpu_tensors"] == "reference"
    records = memsafe_records(caplog)
    assert len(records) == 1 and "backend reference" in records[0].getMessage()
    assert "MEMSAFE_OPS_BACKEND=reference" in records[0].getMessage()


def test_forced_cpp_logs_one_line(monkeypatch, fresh, caplog):
    if _backend._toolchain_problem():
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv(_backend.ENV_BACKEND, "cpp")
    caplog.set_level(logging.INFO, logger="memsafe")
    a = torch.randn(2, 4, 5, 5)
    ops.guidance_diff_norm(a, a * 0.5)
    ops.stop_test(torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), 0.5, 3)
    info = ops.backend_info()
    assert info["backend"] == "cpp" and info["cpu_tensors"] == "cpp" and info["loaded"] is True
    records = memsafe_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO and "backend cpp" in records[0].getMessage()


def test_reset_backend_rereads_the_setting(monkeypatch, fresh):
    """What the WebUI setting does: change MEMSAFE_OPS_BACKEND, then ops.reset_backend()."""
    monkeypatch.setenv(_backend.ENV_BACKEND, "reference")
    assert ops.backend_info(load=True)["backend"] == "reference"
    monkeypatch.setenv(_backend.ENV_BACKEND, "cpp" if not _backend._toolchain_problem() else "reference")
    assert ops.backend_info(load=True)["backend"] == "reference"  # read once...
    ops.reset_backend()
    assert ops.backend_info()["loaded"] is False  # ...until reset; loads again on the next use
    assert ops.backend_info(load=True)["requested"] == os.environ[_backend.ENV_BACKEND]


@pytest.mark.parametrize("value", ["gpu", "CUDA-please", "c++"])
def test_unknown_backend_value_is_a_clear_error(monkeypatch, fresh, value):
    monkeypatch.setenv(_backend.ENV_BACKEND, value)
    with pytest.raises(_backend.BackendError, match=r"MEMSAFE_OPS_BACKEND.*auto, cuda, cpp, reference"):
        ops.guidance_diff_norm(torch.ones(1, 2), torch.zeros(1, 2))


@pytest.mark.skipif(CUDA_OK, reason="checks the error on a machine without CUDA")
def test_forced_cuda_without_cuda_is_a_clear_error(monkeypatch, fresh):
    monkeypatch.setenv(_backend.ENV_BACKEND, "cuda")
    for _ in range(2):  # raised again on the next call, without trying again
        with pytest.raises(_backend.BackendError, match=r"MEMSAFE_OPS_BACKEND=cuda.*Allowed values: auto, cuda"):
            ops.stop_test(torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), 0.5, 3)


def _broken_csrc(tmp_path: Path) -> Path:
    broken = tmp_path / "csrc"
    shutil.copytree(CSRC, broken)
    for name in ("memsafe_ops_cpu.cpp", "memsafe_ops_cuda.cu", "memsafe_ops_cuda_module.cpp"):  # all: fail fast
        path = broken / name
        path.write_text("#error deliberately broken by tests/test_ops.py\n" + path.read_text())
    return broken


def test_failed_build_falls_back_with_one_warning(monkeypatch, fresh, tmp_path, caplog):
    if _backend._toolchain_problem():
        pytest.skip("no C++ toolchain")
    monkeypatch.setattr(_backend, "CSRC", _broken_csrc(tmp_path))
    monkeypatch.setenv(_backend.ENV_BUILD_DIR, str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="memsafe")
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    got = ops.guidance_diff_norm(a, b, rho=3.0)  # must not raise
    want = ops.guidance_diff_norm_ref(a, b, rho=3.0)
    assert all(torch.equal(g, w) for g, w in zip(got[:3], want[:3], strict=True))
    records = memsafe_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert "backend reference" in message and "build failed" in message and "deliberately broken" in message
    assert ops.backend_info()["backend"] == "reference"


def test_unwritable_cache_falls_back(monkeypatch, fresh, tmp_path):
    if _backend._toolchain_problem():
        pytest.skip("no C++ toolchain")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    state = _backend.load("auto", build_root=blocker / "cache", prebuilt=False)
    assert state.name == "reference" and state.cpu is None
    assert "not writable" in state.reason
    with pytest.raises(_backend.BackendError, match="MEMSAFE_OPS_BACKEND=cpp.*not writable"):
        _backend.load("cpp", build_root=blocker / "cache", prebuilt=False)


def test_missing_toolchain_falls_back_quietly(monkeypatch, fresh, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-memsafe")
    caplog.set_level(logging.INFO, logger="memsafe")
    if CUDA_OK:
        pytest.skip("a CUDA machine may have a prebuilt module")
    ops.stop_test(torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), 0.5, 3)
    info = ops.backend_info()
    if info["backend"] != "reference":  # a prebuilt module needs no compiler
        assert "prebuilt" in info["reason"]
        return
    (record,) = memsafe_records(caplog)
    assert record.levelno == logging.INFO and "no C++ compiler" in record.getMessage()


def test_broken_cache_is_rebuilt(fused, tmp_path):
    """A cache whose module does not load (truncated by a full disk or a killed build) is wiped and rebuilt."""
    digest = _backend.source_hash("cpp")
    source = _backend.build_dir(_backend.default_build_root(), digest, "cpp")
    if not any(source.glob("*.so")):
        pytest.skip("the C++ extension in use is not a JIT build (prebuilt module)")
    target = _backend.build_dir(tmp_path, digest, "cpp")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("lock"))
    # The shared cache may come from a checkout elsewhere (same sources, other paths): ninja then rebuilds on the
    # first load from here. That first load runs in another process (a module loaded in this one would be reused
    # whatever the file holds), so that the broken module below is the only reason left to build.
    settle = (f"from pathlib import Path; from memsafe import _backend; m, why, failed = _backend._jit('cpp', "
              f"Path({str(CSRC)!r}), Path({str(tmp_path)!r}), {digest!r}, {{}}); assert m is not None, why")
    subprocess.run([sys.executable, "-c", settle], check=True, capture_output=True, timeout=600, cwd=CSRC.parent)
    so = next(target.glob("*.so"))
    so.write_bytes(b"\0" * 64)
    module, why, failed = _backend._jit("cpp", CSRC, tmp_path, digest, {})
    assert module is not None and not failed and "rebuilt after a broken cache" in why, why


def test_prebuilt_module_is_preferred(fused, tmp_path, monkeypatch):
    """`python -m memsafe._backend build` installs the module where the loader looks first (here: a folder on
    sys.path); a current prebuilt module is used without any build."""
    module = _backend.peek().cpu
    dest = tmp_path / "site"
    dest.mkdir()
    _backend._install(module, dest, _backend.CPP_NAME)
    monkeypatch.syspath_prepend(str(dest))
    monkeypatch.delitem(sys.modules, _backend.CPP_NAME, raising=False)
    try:
        state = _backend.load("cpp", build_root=tmp_path / "no-build-here")
    finally:
        sys.modules.pop(_backend.CPP_NAME, None)
    assert state.cpu is not None and "prebuilt" in state.reason, state.reason
    assert not (tmp_path / "no-build-here").exists()


def test_cache_keys_never_reuse_other_sources_or_torch(tmp_path):
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    assert _backend.source_hash("cpp", copy) == _backend.source_hash("cpp")
    (copy / "memsafe_ops_cpu.cpp").write_text((copy / "memsafe_ops_cpu.cpp").read_text() + "\n// edit\n")
    assert _backend.source_hash("cpp", copy) != _backend.source_hash("cpp")
    assert _backend.source_hash("cuda", copy) == _backend.source_hash("cuda")  # the CUDA build is unaffected
    folder = _backend.build_dir(tmp_path, "abc", "cpp")
    assert folder.parent.name == f"ops-{torch.__version__.replace('+', '_')}-abc"

    class Stale:
        @staticmethod
        def build_info():
            return {"source_hash": "0" * 16, "torch_version": "0.0.0"}

    assert "other sources" in _backend._mismatch(Stale, _backend.source_hash("cpp"))


def test_stale_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    os.utime(lock, (0, 0))
    _backend._clear_stale_lock(tmp_path)
    assert not lock.exists()
    lock.write_text("")  # a fresh lock belongs to a build in progress: kept
    _backend._clear_stale_lock(tmp_path)
    assert lock.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="no CUDA device")
def test_cuda_backend_loads(monkeypatch, fresh):
    monkeypatch.setenv(_backend.ENV_BACKEND, "cuda")
    info = ops.backend_info(load=True)
    assert info["backend"] == "cuda" and info["cuda_tensors"] == "cuda", info


# -- CUDA sources: compile checks with nvcc (no GPU needed) -------------------------------------------------------------
def find_nvcc() -> str | None:
    """The real toolkit's nvcc: $CUDA_HOME, /usr/local/cuda*, then PATH (which may hold a wrapper)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


HEADER_TU = """
#include "memsafe_kernels.cuh"
namespace k = memsafe::cuda;
#define DIFF_NORM(T) template cudaError_t k::launch_diff_norm<T>(const T*, const T*, T*, float*, float*, float*, \\
    const bool*, float, float*, int64_t, int64_t, cudaStream_t);
#define BATCHWISE(T) template cudaError_t k::launch_batchwise_update<T>(float*, const T*, const T*, float, int64_t, \\
    cudaStream_t);
DIFF_NORM(float) DIFF_NORM(__half) DIFF_NORM(__nv_bfloat16)
BATCHWISE(float) BATCHWISE(__half) BATCHWISE(__nv_bfloat16)
cudaError_t (*adamw_launcher)(float*, const float*, float*, float*, int64_t*, const bool*, k::AdamWParams, int64_t,
                           int64_t, cudaStream_t) = &k::launch_adamw;
cudaError_t (*stop_launcher)(const float*, const int64_t*, const bool*, bool*, float, int64_t, int64_t,
                          cudaStream_t) = &k::launch_stop_test;
"""
# torch compiles extension .cu files with these: the header must build under them too.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def test_cuda_header_compiles_for_sm80_and_sm90(tmp_path):
    """Plain nvcc -c on a unit that includes only the kernel header and instantiates every kernel for float,
    half and bfloat16 (the header needs no torch). Both architectures compile at once."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    source = tmp_path / "header_check.cu"
    source.write_text(HEADER_TU)
    jobs = {}
    for arch in ("sm_80", "sm_90"):
        command = [nvcc, "-c", f"-arch={arch}", "-std=c++17", f"-I{CSRC}", *TORCH_NVCC_FLAGS]
        command += ["-Xptxas", "-warn-spills", str(source), "-o", str(tmp_path / f"{arch}.o")]
        jobs[arch] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for arch, job in jobs.items():
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"nvcc {arch} failed:\n{output}"
        assert "warning" not in output.lower(), f"nvcc {arch} warned:\n{output}"
        assert (tmp_path / f"{arch}.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MEMSAFE_TEST_CUDA_BINDING") != "1", reason="set MEMSAFE_TEST_CUDA_BINDING=1 (about 2 minutes)"
)
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """Compile (no link) the torch-facing CUDA binding and its module with this torch's headers, even from a
    CPU-only torch: catches binding errors before a GPU machine sees them. Opt-in: it is slow."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    from torch.utils import cpp_extension

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in cpp_extension.include_paths()):
        # CPU wheels ship the c10/cuda headers but not this generated one
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig

    includes = [f"-I{CSRC}", f"-I{tmp_path / 'stub'}", f"-I{sysconfig.get_paths()['include']}"]
    includes += [f"-I{p}" for p in cpp_extension.include_paths()]
    defines = ["-DTORCH_EXTENSION_NAME=memsafe_ops_cuda", "-DMEMSAFE_SOURCE_HASH=0123456789abcdef"]
    cuda_include = Path(nvcc).resolve().parent.parent / "include"
    jobs = {
        "binding": [nvcc, "-c", "-arch=sm_90", "-std=c++20", *TORCH_NVCC_FLAGS, *includes, *defines]
        + ["-Xcompiler", "-fPIC", str(CSRC / "memsafe_ops_cuda.cu"), "-o", str(tmp_path / "binding.o")],
        "module": [os.environ.get("CXX", "c++"), "-c", "-std=c++20", "-fPIC", *includes, *defines]
        + [f"-I{cuda_include}", "-DTORCH_API_INCLUDE_EXTENSION_H", str(CSRC / "memsafe_ops_cuda_module.cpp")]
        + ["-o", str(tmp_path / "module.o")],
    }
    procs = {
        k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k, c in jobs.items()
    }
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{output[-5000:]}"
