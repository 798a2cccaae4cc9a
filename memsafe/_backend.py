"""Finding and loading the compiled fused ops (csrc/), lazily, once, never breaking the caller.

What :func:`get` promises:

- Nothing happens at import: the first op call (or ``backend_info(load=True)``) loads, once per process, under a
  lock, and logs exactly one line on the ``memsafe`` logger saying which backend is in use and why.
- Order, per extension: a prebuilt module (``memsafe.memsafe_ops_cpp`` / ``memsafe_ops_cpp``, made by
  ``python -m memsafe._backend build``) when it was built from these very sources for this torch; else a JIT build
  with ``torch.utils.cpp_extension.load`` (ninja) in a cache folder keyed by torch version and source hash (so a
  cache from other sources or another torch is never reused); else nothing.
- The CUDA extension is tried only where torch has CUDA and sees a device and a CUDA toolkit whose nvcc has the
  CUDA major version torch was built with. CPU tensors use the C++ extension; with neither, the reference.
- In ``auto`` mode nothing raises: a missing compiler or ninja, a failed build, a broken or stale cache all end in
  the reference (or the C++ build) with the reason in the log line. A cache that fails to load is wiped and built
  again once.
- ``MEMSAFE_OPS_BACKEND=auto|cuda|cpp|reference`` forces a backend; a forced backend that cannot be had raises
  :class:`BackendError` naming the variable and the allowed values (on every op call, without rebuilding).
- ``MEMSAFE_BUILD_DIR`` sets the cache root (default ``$XDG_CACHE_HOME/memsafe`` or ``~/.cache/memsafe``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger("memsafe")

ENV_BACKEND = "MEMSAFE_OPS_BACKEND"
ENV_BUILD_DIR = "MEMSAFE_BUILD_DIR"
CHOICES = ("auto", "cuda", "cpp", "reference")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPP_NAME = "memsafe_ops_cpp"
CUDA_NAME = "memsafe_ops_cuda"
CPP_SOURCES = ("memsafe_ops_cpu.cpp",)
CUDA_SOURCES = ("memsafe_ops_cuda.cu", "memsafe_ops_cuda_module.cpp")
# Every file each build reads from csrc/ (what its source hash covers): editing the CUDA kernels does not throw
# away the C++ build, and the other way round.
_HASHED = {"cpp": CPP_SOURCES, "cuda": (*CUDA_SOURCES, "memsafe_kernels.cuh", "memsafe_ops_cuda.h")}
# Bump when the build recipe below changes in a way the sources do not show (flags, names): new cache folders.
_RECIPE = "1"
_STALE_LOCK_S = 15 * 60  # a build never takes this long; an older lock file was left by a killed process


class BackendError(RuntimeError):
    """A forced backend (``MEMSAFE_OPS_BACKEND``) is unknown or cannot be loaded."""


@dataclass(frozen=True)
class Backends:
    """What is loaded. ``cpu``/``cuda``: the extension modules serving CPU / CUDA tensors (None: reference)."""

    name: str  # "cuda", "cpp" or "reference": the best backend loaded
    reason: str  # one line: why
    requested: str  # the MEMSAFE_OPS_BACKEND value in effect
    cpu: ModuleType | None = None
    cuda: ModuleType | None = None
    details: dict[str, Any] = field(default_factory=dict)


_lock = threading.Lock()
_state: Backends | None = None
_error: BackendError | None = None


def get() -> Backends:
    """The loaded backends; loads them on the first call (thread-safe, once, one log line). Raises
    :class:`BackendError` only when ``MEMSAFE_OPS_BACKEND`` forces a backend that is unavailable."""
    state = _state
    if state is not None:
        return state
    return _load_once()


def _load_once() -> Backends:
    global _state, _error
    with _lock:
        if _state is not None:
            return _state
        if _error is not None:  # a forced backend failed: say it again, do not rebuild on every call
            raise _error
        try:
            state = load()
        except BackendError as e:
            _error = e
            raise
        logger.log(
            logging.WARNING if state.details.get("failures") else logging.INFO,
            "memsafe ops: backend %s (%s)",
            state.name,
            state.reason,
        )
        _state = state
        return state


def peek() -> Backends | None:
    """The loaded backends, or None before the first load (never loads)."""
    return _state


def reset() -> None:
    """Forget what was loaded (tests): the next :func:`get` reads the environment and loads again."""
    global _state, _error
    with _lock:
        _state = None
        _error = None


def info(load: bool = False) -> dict[str, Any]:
    """JSON-ready description of the backend in use. With ``load=False`` (default) nothing is built: before the
    first op call the answer says so (``"loaded": False``)."""
    state = _state
    if state is None and load:
        state = get()
    base: dict[str, Any] = {
        "requested": os.environ.get(ENV_BACKEND, "auto") or "auto",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    if state is None:
        return {"loaded": False, "backend": None, "reason": "not loaded yet (loads on first use)", **base}
    return {
        "loaded": True,
        "backend": state.name,
        "reason": state.reason,
        "cpu_tensors": "cpp" if state.cpu is not None else "reference",
        "cuda_tensors": "cuda" if state.cuda is not None else "reference",
        **base,
        "requested": state.requested,
        **{k: v for k, v in state.details.items() if k != "failures"},
    }


# -- selection ---------------------------------------------------------------------------------------------------
def requested_backend() -> str:
    """The validated value of ``MEMSAFE_OPS_BACKEND`` (default ``auto``)."""
    value = (os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    if value not in CHOICES:
        raise BackendError(
            f"memsafe: {ENV_BACKEND}={os.environ.get(ENV_BACKEND)!r} is not allowed; use one of {', '.join(CHOICES)}"
        )
    return value


def load(
    requested: str | None = None,
    *,
    csrc: Path | None = None,
    build_root: Path | None = None,
    prebuilt: bool = True,
) -> Backends:
    """Load the backends for ``requested`` (default: the environment) without touching the process-wide state and
    without logging. Never raises in ``auto`` mode; raises :class:`BackendError` when a forced backend is
    unavailable. ``csrc``/``build_root``/``prebuilt`` exist for tests and the build command."""
    requested = requested_backend() if requested is None else requested
    if requested not in CHOICES:
        raise BackendError(f"memsafe: backend {requested!r} is not one of {', '.join(CHOICES)}")
    t0 = time.perf_counter()
    if requested == "reference":
        return Backends("reference", f"{ENV_BACKEND}=reference", requested)
    csrc = (csrc or CSRC).resolve()
    root = Path(build_root) if build_root is not None else default_build_root()
    details: dict[str, Any] = {"failures": False}
    notes: list[str] = []

    cuda_mod = None
    if requested in ("auto", "cuda"):
        cuda_mod, why = _load_extension("cuda", csrc, root, prebuilt, details)
        notes.append(why)
        if cuda_mod is None and requested == "cuda":
            raise _forced_error("cuda", why)
    cpu_mod, why = _load_extension("cpp", csrc, root, prebuilt, details)
    notes.append(why)
    if cpu_mod is None and requested == "cpp":
        raise _forced_error("cpp", why)

    name = "cuda" if cuda_mod is not None else "cpp" if cpu_mod is not None else "reference"
    if requested != "auto":
        notes.insert(0, f"{ENV_BACKEND}={requested}")
    details["load_seconds"] = round(time.perf_counter() - t0, 2)
    return Backends(name, "; ".join(notes), requested, cpu_mod, cuda_mod, details)


def _forced_error(kind: str, why: str) -> BackendError:
    return BackendError(
        f"memsafe: {ENV_BACKEND}={kind} but the {kind} backend is unavailable: {why}. "
        f"Allowed values: {', '.join(CHOICES)} (auto falls back to what is available)."
    )


# -- one extension -----------------------------------------------------------------------------------------------
def _load_extension(
    kind: str, csrc: Path, root: Path, prebuilt: bool, details: dict[str, Any]
) -> tuple[ModuleType | None, str]:
    """(module, why) for ``kind`` in {"cpp", "cuda"}; module None with the reason when unavailable. Never raises."""
    label = "C++ CPU extension" if kind == "cpp" else "CUDA extension"
    try:
        if kind == "cuda":
            problem = _cuda_unavailable()
            if problem:
                return None, f"no CUDA: {problem}"
        missing = [name for name in _HASHED[kind] if not (csrc / name).is_file()]
        if missing:
            details["failures"] = True
            return None, f"{label} unavailable: sources missing in {csrc} ({', '.join(missing)})"
        digest = source_hash(kind, csrc)
        details[f"{kind}_source_hash"] = digest
        name = CPP_NAME if kind == "cpp" else CUDA_NAME
        if prebuilt and csrc == CSRC.resolve():
            module, why = _import_prebuilt(name, digest, kind)
            if module is not None:
                details[f"{kind}_origin"] = why
                return module, f"{label}: {why}"
            prebuilt_note = f"{why}; " if why else ""
        else:
            prebuilt_note = ""
        module, why, failed = _jit(kind, csrc, root, digest, details)
        if module is None:
            details["failures"] = details["failures"] or failed
            return None, f"{prebuilt_note}{label} unavailable: {why}"
        return module, f"{prebuilt_note}{label}: {why}"
    except Exception as e:  # the loader must never break the caller
        details["failures"] = True
        return None, f"{label} unavailable: unexpected {type(e).__name__}: {_one_line(str(e))}"


def _cuda_unavailable() -> str:
    """Why the CUDA extension cannot be had here ('' when it can be tried)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    home, why = find_cuda_home()
    if home is None:
        return why
    return ""


def _import_prebuilt(name: str, digest: str, kind: str) -> tuple[ModuleType | None, str]:
    """A prebuilt module built from these sources for this torch, or (None, why-not; '' when there is none)."""
    for full in (f"memsafe.{name}", name):
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name in (full, name):
                continue
            return None, f"prebuilt {full} does not import ({_one_line(str(e))})"
        except Exception as e:  # wrong torch ABI (undefined symbol), corrupt file, ...
            return None, f"prebuilt {full} does not import ({type(e).__name__}: {_one_line(str(e))})"
        problem = _mismatch(module, digest)
        if problem:
            return None, f"prebuilt {full} ignored ({problem})"
        problem = _self_check(module, kind)
        if problem:
            return None, f"prebuilt {full} ignored (self-check failed: {problem})"
        return module, f"prebuilt {full}"
    return None, ""


def _mismatch(module: ModuleType, digest: str) -> str:
    try:
        built = module.build_info()
    except Exception as e:
        return f"no build_info: {e}"
    if built.get("source_hash") != digest:
        return f"built from other sources ({built.get('source_hash')} != {digest})"
    if built.get("torch_version") != _torch_base_version():
        return f"built for torch {built.get('torch_version')}, running {_torch_base_version()}"
    return ""


def _jit(
    kind: str, csrc: Path, root: Path, digest: str, details: dict[str, Any]
) -> tuple[ModuleType | None, str, bool]:
    """JIT build (or reuse of the cache) of one extension: (module, how, False), or (None, why, failed) where
    ``failed`` tells a failure (worth a warning) from a machine that simply has no toolchain."""
    problem = _toolchain_problem()
    if problem:
        return None, problem, False
    folder = build_dir(root, digest, kind)
    details[f"{kind}_build_dir"] = str(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return None, f"cache folder {folder} is not writable ({type(e).__name__}: {e.strerror or e})", True
    _clear_stale_lock(folder)
    before = _binaries(folder)
    had_cache = bool(before)
    t0 = time.perf_counter()
    module, error = _build(kind, csrc, folder, digest)
    if module is None and had_cache:
        # A cache that exists but does not load (truncated file, killed build, other machine): wipe it, build again.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        module, error = _build(kind, csrc, folder, digest)
        if module is not None:
            error = "rebuilt after a broken cache"
    seconds = time.perf_counter() - t0
    if module is None:
        log = folder / "build-error.log"
        with contextlib.suppress(OSError):
            log.write_text(error)
        return None, f"build failed ({_summary(error)}; full log {log})", True
    built = "cached build" if _binaries(folder) == before else f"JIT build {seconds:.1f} s"
    details[f"{kind}_origin"] = "jit"
    note = f", {error}" if error else ""
    return module, f"{built} in {folder}{note}", False


def _binaries(folder: Path) -> dict[str, int]:
    """Built modules in ``folder`` with their modification times (to tell a cache hit from a build)."""
    found = {}
    for path in [*folder.glob("*.so"), *folder.glob("*.pyd")]:
        with contextlib.suppress(OSError):
            found[path.name] = path.stat().st_mtime_ns
    return found


def _build(kind: str, csrc: Path, folder: Path, digest: str) -> tuple[ModuleType | None, str]:
    """Run torch.utils.cpp_extension.load; (module, '') or (None, error text)."""
    from torch.utils import cpp_extension

    define = f"-DMEMSAFE_SOURCE_HASH={digest}"
    if os.name == "nt":
        cflags = ["/O2", "/openmp", "/fp:precise", define]
        ldflags: list[str] = []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: at::parallel_for then runs on one thread
        cflags, ldflags = ["-O3", "-ffp-contract=off", define], []
    else:  # -ffp-contract=off: no FMA contraction, so results equal the reference's roundings
        cflags, ldflags = ["-O3", "-fopenmp", "-ffp-contract=off", define], ["-fopenmp"]
    kwargs: dict[str, Any] = {}
    if kind == "cpp":
        name, sources = CPP_NAME, [str(csrc / s) for s in CPP_SOURCES]
    else:
        name, sources = CUDA_NAME, [str(csrc / s) for s in CUDA_SOURCES]
        home, _ = find_cuda_home()
        # torch fixes CUDA_HOME when cpp_extension is imported, from `which nvcc`; that may be a wrapper script
        # (not a toolkit) or another version. Point the build at the toolkit that was checked.
        cpp_extension.CUDA_HOME = home
        kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo", define]
        cflags = [f for f in cflags if f not in ("-fopenmp", "/openmp")]
        ldflags = []
    # torch renames a module (name_v1, ...) when one process loads it again from another folder or other sources,
    # which would miss our cache. Our folders are already keyed by sources and torch: keep the plain name.
    versions = getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", None)
    if isinstance(versions, dict):
        versions.pop(name, None)
    error = ""
    try:
        with warnings.catch_warnings(record=True), _ninja_on_path():
            module = cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                extra_include_paths=[str(csrc)],
                build_directory=str(folder),
                verbose=False,
                **kwargs,
            )
    except BaseException as e:  # SystemExit/KeyboardInterrupt from a build tool must not escape either
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"{type(e).__name__}: {e}"
    problem = _mismatch(module, digest) or _self_check(module, kind)
    if problem:
        error = f"built module rejected: {problem}"
        return None, error
    return module, ""


def _self_check(module: ModuleType, kind: str) -> str:
    """Run the module once on a tiny input and compare with the reference ('' when it agrees). Catches an
    ABI-broken or miscompiled binary (or a GPU arch missing from it) before any real call reaches it."""
    try:
        from . import ops

        device = "cuda" if kind == "cuda" else "cpu"
        a = torch.tensor([[3.0, 1.0, -2.0], [0.0, 0.0, 0.0]], device=device)
        b = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], device=device)
        active = torch.tensor([True, False], device=device)
        got = ops._run_diff_norm(module, device, a, b, 2.0, active)
        want = ops.guidance_diff_norm_ref(a, b, rho=2.0, active=active)
        for g, w in zip(got, want, strict=True):
            assert g is not None and w is not None
            if not torch.allclose(g.float().cpu(), w.float().cpu(), rtol=1e-6, atol=1e-6):
                return f"self-check mismatch: {g.tolist()} != {w.tolist()}"
    except Exception as e:
        return f"{type(e).__name__}: {_one_line(str(e))}"
    return ""


# -- environment -------------------------------------------------------------------------------------------------
def default_build_root() -> Path:
    """``MEMSAFE_BUILD_DIR``, else the per-user cache (``%LOCALAPPDATA%`` on Windows, ``$XDG_CACHE_HOME`` or
    ``~/.cache`` elsewhere) + ``/memsafe``."""
    env = os.environ.get(ENV_BUILD_DIR)
    if env:
        return Path(env).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "memsafe" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memsafe"


def build_dir(root: Path, digest: str, kind: str) -> Path:
    """``<root>/ops-<torch>-<source hash>/<kind>[-<GPU archs>]``: a folder only these sources and this torch use."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    if kind == "cuda":
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = sorted(f"sm{major}{minor}" for major, minor in capabilities)
        kind = "cuda-" + "_".join(archs)
    return root / f"ops-{tag}-{digest}" / kind


def source_hash(kind: str, csrc: Path | None = None) -> str:
    """16 hex digits over the files the ``kind`` ("cpp" or "cuda") build reads and the build recipe version."""
    h = hashlib.sha256(f"memsafe-ops-{kind}-recipe-{_RECIPE}".encode())
    for name in _HASHED[kind]:
        h.update(name.encode() + b"\0" + ((csrc or CSRC) / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _torch_base_version() -> str:
    return torch.__version__.split("+")[0]


def _toolchain_problem() -> str:
    """'' when a C++ compiler and ninja are there, else what is missing."""
    compiler = "cl" if os.name == "nt" else os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    with _ninja_on_path():
        if shutil.which("ninja") is None:
            return "no ninja (pip install ninja)"
    return ""


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs `ninja` from PATH; a venv used without activation (`.venv/bin/python ...`) has it in its bin
    folder or in the `ninja` package only. Add that folder to PATH for the build, and only then."""
    if shutil.which("ninja") is not None:
        yield
        return
    folders = [Path(sys.executable).parent]
    with contextlib.suppress(Exception):
        import ninja  # type: ignore[import-not-found]

        folders.insert(0, Path(ninja.BIN_DIR))
    found = next((f for f in folders if shutil.which("ninja", path=str(f))), None)
    if found is None:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = str(found) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _clear_stale_lock(folder: Path) -> None:
    """torch's build lock (a file named `lock`) stays behind when a build is killed, and the next build waits for
    it forever. One older than any build could take is removed."""
    lock = folder / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()


_cuda_home_cache: tuple[str | None, str] | None = None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit folder, '') for a CUDA toolkit whose nvcc has torch's CUDA major version (same minor preferred),
    else (None, why). Looks at CUDA_HOME, CUDA_PATH, the nvcc on PATH (resolving wrapper scripts by checking for
    the toolkit's headers) and the usual install folders."""
    global _cuda_home_cache
    if _cuda_home_cache is None:
        _cuda_home_cache = _find_cuda_home()
    return _cuda_home_cache


def _find_cuda_home() -> tuple[str | None, str]:
    want = torch.version.cuda
    if want is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    if os.name == "nt":
        program_files = Path(os.environ.get("PROGRAMFILES", "C:/Program Files"))
        base = program_files / "NVIDIA GPU Computing Toolkit" / "CUDA"
        candidates += sorted(base.glob("v*"), reverse=True)
    else:
        candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    found: list[tuple[Path, str]] = []
    for home in dict.fromkeys(candidates):  # keep order, drop duplicates
        version = _nvcc_version(home)
        if version:
            found.append((home, version))
    if not found:
        return None, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    major = want.split(".")[0]
    for home, version in found:
        if version == want:
            return str(home), ""
    for home, version in found:
        if version.split(".")[0] == major:
            return str(home), ""
    listed = ", ".join(f"{v} at {h}" for h, v in found)
    return None, f"no nvcc matches torch's CUDA {want} (found {listed})"


def _nvcc_version(home: Path) -> str:
    exe = home / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    if not exe.is_file() or not (home / "include" / "cuda_runtime.h").is_file():
        return ""
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _summary(error: str, limit: int = 300) -> str:
    """The most telling line of a build error (the first compiler error, else the first line)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line[:limit]
    return (lines[0] if lines else "unknown error")[:limit]


# -- command line: python -m memsafe._backend {build,info} -----------------------------------------------------------
def _install(module: ModuleType, dest: Path, name: str) -> Path:
    source = Path(module.__file__ or "")
    target = dest / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    shutil.copy2(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """``build [--kind cpp|cuda|all] [--dest DIR]``: build the extensions and copy them into ``DIR`` (default:
    the memsafe package, where the loader looks first). ``info``: load as an op call would and print the result."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m memsafe._backend")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the extensions and install them as prebuilt modules")
    build.add_argument("--kind", choices=("cpp", "cuda", "all"), default="all")
    build.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent)
    sub.add_parser("info", help="load the backends as the first op call would, and print what was chosen")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "info":
        print(json.dumps(info(load=True), indent=2))
        return 0
    status = 0
    kinds = ("cpp", "cuda") if args.kind == "all" else (args.kind,)
    for kind in kinds:
        details: dict[str, Any] = {"failures": False}
        module, why = _load_extension(kind, CSRC, default_build_root(), False, details)
        if module is None:
            print(f"{kind}: not built: {why}")
            status = status or (1 if args.kind != "all" or kind == "cpp" else 0)
            continue
        target = _install(module, args.dest, CPP_NAME if kind == "cpp" else CUDA_NAME)
        print(f"{kind}: {why}; installed {target}")
    print(f"platform: {platform.platform()}, torch {torch.__version__}")
    return status


if __name__ == "__main__":
    # Run the package's copy of this module, the one memsafe.ops uses, not this __main__ copy.
    from memsafe._backend import main as _main

    sys.exit(_main())
