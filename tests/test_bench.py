"""The benchmark harness's names: what each per_sample* bench name runs, and that the lab efficacy a bench row
carries was measured with the same settings (bench/perf.py, memsafe/lab/evaluate.py)."""

import json

import pytest
import torch

from bench import perf
from memsafe.lab.evaluate import FD_RADIUS, variant_methods
from memsafe.lab.runner import lab_config

BASE = lab_config("per_sample", fd_radius=FD_RADIUS)  # what `bench perf --model lab` starts from


@pytest.mark.parametrize(
    ("name", "gradient", "optimizer", "options"),
    [
        ("per_sample", "autograd", "adamw", {"checkpointing": "never", "memory_budget": None, "max_batch": None}),
        ("per_sample_fd", "finite_difference", "adamw",
         {"checkpointing": "never", "memory_budget": None, "max_batch": None}),
        ("per_sample_fd_polyak", "finite_difference", "polyak",
         {"checkpointing": "never", "memory_budget": None, "max_batch": None}),
        ("per_sample_polyak_checkpointed_one", "autograd", "polyak",
         {"checkpointing": "always", "memory_budget": None, "max_batch": 1}),
        ("per_sample_polyak_budget500", "autograd", "polyak",
         {"checkpointing": "budget", "memory_budget": 500 * 2**20, "max_batch": None}),
        ("per_sample_budget", "autograd", "adamw", {"checkpointing": "budget", "memory_budget": None, "max_batch": None}),
    ],
)
def test_a_per_sample_bench_name_runs_the_step_gradient_and_recomputation_it_names(name, gradient, optimizer,
                                                                                     options):
    config, got = perf.per_sample_variant(name, BASE)
    assert (config.method, config.gradient, config.optimizer) == ("per_sample", gradient, optimizer)
    assert got == options
    assert (config.target, config.lr, config.fd_radius) == (BASE.target, BASE.lr, BASE.fd_radius)


def test_a_polyak_bench_name_can_set_the_largest_step_and_the_held_norm_steps():
    config, options = perf.per_sample_variant("per_sample_polyak_step0.1_hold2_budget500", BASE)
    assert (config.optimizer, config.max_step, config.hold_norm_steps) == ("polyak", 0.1, 2)
    assert options["memory_budget"] == 500 * 2**20
    plain, _ = perf.per_sample_variant("per_sample_polyak", BASE)
    assert (plain.max_step, plain.hold_norm_steps) == (BASE.max_step, BASE.hold_norm_steps)
    assert perf.lab_efficacy_row("per_sample_polyak_step0.1_hold2_one") == ("variants",
                                                                           "per_sample_polyak_step0.1_hold2")


@pytest.mark.parametrize("name", ["per_sample_polyak_fd", "per_sample_exact_one", "per_sample_budgetx", "batch_wise",
                                  "per_sample_hold2", "per_sample_polyak_hold2_step0.1", "per_sample_polyak_step"])
def test_a_name_outside_the_per_sample_grammar_is_refused(name):
    with pytest.raises(ValueError, match="per_sample\\[_fd\\]\\[_polyak\\[_step<S>\\]"):
        perf.per_sample_variant(name, BASE)


def test_the_lab_efficacy_a_bench_row_carries_was_measured_with_the_settings_the_row_times():
    """A bench row shows the replication and alignment of a lab.json row: both must run the same config (a
    checkpointed or one-image-per-call bench variant gives the images of the lab variant without it)."""
    lab = {m.label: m for m in variant_methods()}
    names = [*perf.METHODS, "per_sample_fd_checkpointed_one", "per_sample_polyak_budget500",
             "per_sample_polyak_step0.1_hold2", "per_sample_polyak_step0.1_hold2_budget500"]
    assert perf.lab_efficacy_row("auto_safe") is None and perf.lab_efficacy_row("plain") == ("main", "no mitigation")
    for name in names:
        section, label = perf.lab_efficacy_row(name) or ("", "")
        if section != "variants":
            continue
        measured = lab[label]
        if name == "per_sample_exact":
            assert measured.max_batch == 1 and measured.config.optimizer == "adamw"
            assert measured.config.gradient == "autograd"
            continue
        config, _ = perf.per_sample_variant(name, BASE)
        if config.gradient == "autograd":  # the finite-difference radius is not used: only what is
            config = config.replace(fd_radius=measured.config.fd_radius)
        assert config.to_dict() == measured.config.to_dict(), name
        assert measured.max_batch is None, name


REQUIRED = ("model", "device", "method", "time_ratio", "peak_memory_ratio", "evaluations_per_image")


@pytest.mark.slow
def test_one_perf_run_writes_the_rows_the_issue_asks_for_with_exact_evaluation_counts(tmp_path):
    """The harness end to end on a tiny UNet: plain and two methods in one run, time and memory measured (the
    memory in child processes), rows merged into perf.json and rendered into perf.md."""
    perf.main(["--model", "tiny", "--steps", "4", "--batch", "2", "--repeats", "2", "--threads", "1",
               "--target-ratio", "0.01", "--max-iterations", "2", "--out", str(tmp_path),
               "--methods", "plain,batch_wise,per_sample_polyak"])
    rows = {r["method"]: r for r in json.loads((tmp_path / "perf.json").read_text())}
    assert set(rows) == {"plain", "batch_wise", "per_sample_polyak"}
    for row in rows.values():
        assert all(row[k] is not None for k in REQUIRED) and row["model"] == "tiny" and row["device"] == "cpu"
        assert len(row["time_ratios"]) == 2 and len(row["cpu_time_ratios"]) == 2 and row["peak_memory_bytes"] > 0
    assert rows["plain"]["time_ratio"] == 1.0 and rows["plain"]["peak_memory_ratio"] == 1.0
    assert rows["plain"]["cpu_time_ratio"] == 1.0
    # per-sample does more work than plain in every repeat, whatever else ran on the machine: its CPU time shows it
    assert min(ps_ratios := rows["per_sample_polyak"]["cpu_time_ratios"]) > 1.0, ps_ratios
    assert rows["plain"]["evaluations_per_image"] == 4  # one CFG call per step
    # batch-wise (lab preset's 2 iterations, 2 rows each) adds forward passes only
    assert rows["batch_wise"]["backward_per_image"] == 0 and rows["batch_wise"]["forward_per_image"] > 0
    # a target far below the risk: both images use the 2 iterations (2 backward passes), plus the final check,
    # whose outputs are the first sampling step
    ps = rows["per_sample_polyak"]
    assert (ps["iterations_mean"], ps["backward_per_image"], ps["forward_per_image"]) == (2.0, 2.0, 3.0)
    assert ps["reused_calls"] == 1 and ps["evaluations_per_image"] == 3 + 2 + 4 - 1
    # the same as whole-UNet calls of the batch (cond and uncond rows together): plain's 4 steps; Polyak's first
    # evaluation and its 2 checks under autograd, a backward pass after the 2 that did not stop, 3 sampler calls
    assert (rows["plain"]["unet_calls"], rows["plain"]["unet_rows"], rows["plain"]["unet_grad_calls"]) == (4, 16, 0)
    assert (ps["unet_calls"], ps["unet_grad_calls"], ps["unet_grad_rows"], ps["unet_backward_calls"]) == (3, 3, 12, 2)
    assert rows["batch_wise"]["unet_grad_calls"] == 0 and rows["batch_wise"]["unet_calls"] > 4
    table = (tmp_path / "perf.md").read_text()
    assert "| tiny | cpu | 2 | per_sample_polyak |" in table and " | 3 / 3 / 2 | " in table
    polyak = rows["per_sample_polyak"]
    assert f" | {polyak['cpu_time_ratio']:.3f} ({min(ps_ratios):.2f}-{max(ps_ratios):.2f}) | " in table


def _row(model: str, method: str, batch: int = 2, device: str = "cpu", ratio: float = 1.0) -> dict:
    return {"model": model, "device": device, "method": method, "batch": batch, "time_ratio": ratio,
            "peak_memory_ratio": ratio, "evaluations_per_image": 1.0, "command": f"python -m bench perf {model}"}


def test_written_rows_stay_grouped_by_model_device_and_batch_whatever_order_they_arrive_in(tmp_path):
    """A memory-only run, an imported GPU run or a new variant adds rows at the end of the list it merges into;
    the files still read group by group, plain first, a replaced row taking its new values in its place."""
    perf.write_rows([_row("sd15", "per_sample_polyak"), _row("lab", "plain", 8), _row("sd15", "plain")], tmp_path)
    perf.write_rows([_row("sd15", "per_sample_polyak_budget1000_one"), _row("sd15", "per_sample_polyak_budget500_one"),
                     _row("sd15", "plain", device="cuda"),
                     _row("sd15@8", "batch_wise"), _row("sd15", "per_sample_polyak", ratio=1.2),
                     _row("sd15", "plain", 1), _row("sd15", "batch_wise")], tmp_path)
    rows = json.loads((tmp_path / "perf.json").read_text())
    assert [(r["device"], r["model"], r["batch"], r["method"]) for r in rows] == [
        ("cpu", "lab", 8, "plain"), ("cpu", "sd15@8", 2, "batch_wise"), ("cpu", "sd15", 1, "plain"),
        ("cpu", "sd15", 2, "plain"), ("cpu", "sd15", 2, "batch_wise"), ("cpu", "sd15", 2, "per_sample_polyak"),
        ("cpu", "sd15", 2, "per_sample_polyak_budget500_one"), ("cpu", "sd15", 2, "per_sample_polyak_budget1000_one"),
        ("cuda", "sd15", 2, "plain")]
    assert rows[5]["time_ratio"] == 1.2  # the replaced row, in its place
    table = [line for line in (tmp_path / "perf.md").read_text().splitlines() if line.startswith("| ")][1:]  # after the header
    assert [line.split(" | ")[3] for line in table] == [r["method"] for r in rows]


def test_recorded_commands_leave_out_the_scratch_folder_the_rows_were_written_to():
    assert perf._command(["--model", "sd15", "--out", "/tmp/m2", "--batch", "2"]) == \
        "python -m bench perf --model sd15 --batch 2"
    assert perf._command(["--out=/tmp/x", "--model", "lab"]) == "python -m bench perf --model lab"


def test_the_committed_results_have_the_fields_the_issue_asks_for():
    rows = json.loads((perf.RESULTS / "perf.json").read_text())
    for row in rows:
        assert all(k in row for k in REQUIRED), row["method"]
    lab = [r for r in rows if r["model"] == "lab"]
    assert {"plain", "per_sample_exact", "per_sample_polyak"} <= {r["method"] for r in lab}
    for row in lab:
        if perf.lab_efficacy_row(row["method"]) is not None:
            assert 0 <= row["replication_rate"] <= 1 and 0 <= row["alignment"] <= 1, row["method"]


def test_bench_adjust_counts_one_adjustment_in_unet_calls_and_predicts_from_the_reuse(capsys):
    """bench adjust on a tiny UNet: a target far below the risk holds both images to the 2 iterations; the
    counts are those of one adjustment (the first evaluation and 2 checks under autograd, 2 backward passes), the
    last check is the sampler's first call, and the prediction is 1 + (calls - reused) / steps."""
    from bench import adjust

    args = adjust.parse_args(["--model", "tiny", "--batch", "2", "--steps", "10", "--repeats", "2", "--threads", "1",
                              "--target-ratio", "0.01", "--max-iterations", "2"])
    report = adjust.measure(args)
    assert report["iterations"] == [2, 2]
    assert (report["unet_calls"], report["unet_grad_calls"], report["unet_backward_calls"]) == (0, 3, 2)
    assert report["reused"] == 1 and len(report["ratios"]) == 2 and all(r > 0 for r in report["ratios"])
    assert report["predicted_ratio"] == pytest.approx(1 + (report["calls"] - 1) / 10)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        adjust.parse_args(["--method", "per_sample_exact"])
    assert (f"--method 'per_sample_exact': allowed are batch_wise and the per-sample variants "
            f"{perf.PER_SAMPLE_FORMS}") in capsys.readouterr().err


def test_bench_adjust_times_the_batch_wise_method_in_forward_calls_with_nothing_to_reuse():
    """bench adjust --method batch_wise: the preset's iterations for every image, two no-grad calls each (the
    guidance at z and at the probe), nothing under autograd; the sampler's first call is at the moved noise, so
    it is made, and the prediction is 1 + calls / steps."""
    from bench import adjust

    args = adjust.parse_args(["--model", "tiny", "--batch", "2", "--steps", "10", "--repeats", "2", "--threads", "1",
                              "--method", "batch_wise"])
    iterations = perf.setup(args)[-1].iterations
    report = adjust.measure(args)
    assert report["iterations"] == [iterations, iterations]
    assert (report["unet_calls"], report["unet_grad_calls"], report["unet_backward_calls"]) == (2 * iterations, 0, 0)
    assert report["reused"] == 0 and all(r > 0 for r in report["ratios"])
    assert report["predicted_ratio"] == pytest.approx(1 + report["calls"] / 10)


def test_bench_jacobian_tells_the_gradient_from_the_forward_only_product_of_a_known_jacobian():
    """On eps_tilde(z) = A z with A not symmetric, the three ways give exactly A^T u (vjp) and A u (jvp, and the
    finite difference, exact on a linear map); with A symmetric the cosine between them is 1."""
    from bench import jacobian

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64).float()
    z = torch.randn(3, 3, 2, 2, generator=gen)

    def linear(matrix):
        return lambda x: (x.flatten(1) @ matrix.T).view_as(x)

    found = jacobian.directions(linear(a), z, h=0.5)
    u = found["u"].flatten(1)
    assert torch.allclose(found["vjp"].flatten(1), u @ a, atol=1e-5)  # rows: (A^T u)^T = u^T A
    assert torch.allclose(found["jvp"].flatten(1), u @ a.T, atol=1e-5)
    assert torch.allclose(found["fd"].flatten(1), u @ a.T, atol=1e-4)
    assert (jacobian.cosine(found["vjp"], found["jvp"]) < 0.99).all()
    symmetric = jacobian.directions(linear(a + a.T), z, h=0.5)
    assert torch.allclose(jacobian.cosine(symmetric["vjp"], symmetric["jvp"]), torch.ones(3, dtype=torch.float64))


def test_bench_jacobian_on_a_unet_measures_every_way_and_the_finite_difference_is_the_forward_product(capsys):
    """bench jacobian on a tiny UNet: per-image cosines in [-1, 1], the finite difference at a small radius
    pointing where forward-mode AD's exact J u does, a time and a peak for each way, and the backward pass
    holding more than a no-grad call."""
    from bench import jacobian

    jacobian.main(["--model", "tiny", "--batch", "2", "--repeats", "1", "--threads", "1", "--fd-radius", "0.01"])
    out = capsys.readouterr().out
    assert "cos(J u, J^T u) per image" in out and "jvp:" in out
    args = jacobian.parse_args(["--model", "tiny", "--batch", "2", "--repeats", "2", "--threads", "1",
                                "--fd-radius", "0.01"])
    report = jacobian.measure(args)
    assert len(report["cos_ju_jtu"]) == 2 and all(-1 <= c <= 1 for c in report["cos_ju_jtu"])
    assert all(c > 0.99 for c in report["cos_fd_ju"])
    assert set(report["calls"]) == set(jacobian.WAYS) and all(v > 0 for v in report["calls"].values())
    assert report["peak_bytes"]["vjp"] > report["peak_bytes"]["call"] > 0


def test_bench_saved_profile_splits_both_passes_by_operator_family(capsys):
    """bench saved --profile on a tiny UNet (it has convolutions, attention and linear layers): every family
    that the UNet runs gets time in both passes, and the printed totals and ratios are those of the families."""
    from bench import saved
    from bench.models import build

    assert [saved.op_family(n) for n in ("aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                                         "aten::_softmax", "aten::convolution_backward", "aten::mkldnn_convolution",
                                         "aten::addmm", "aten::mm", "aten::native_group_norm",
                                         "autograd::engine::evaluate_function: ConvolutionBackward0")] == [
        "attention", "attention", "convolution", "convolution", "linear", "linear", "other", "convolution"]
    subject = build("tiny")
    cond, _ = subject.conditioning(1, seed=0)
    sigma = subject.denoiser.get_sigmas(10)[:1]

    def make_x() -> torch.Tensor:
        return torch.randn(1, *subject.latent).requires_grad_(True)

    runs = saved.profile_passes(subject.denoiser.unet, lambda x: subject.denoiser(x, sigma, **cond), make_x, 3)
    assert len(runs) == 3
    for times in runs:
        assert set(times) == {"forward", "backward"}
        for passed in times.values():
            assert set(passed) == {"attention", "convolution", "linear", "other"}
            assert all(t > 0 for t in passed.values())
    assert all(p.requires_grad for p in subject.denoiser.unet.parameters())  # the weights are given back
    saved.print_profile(runs)
    out = capsys.readouterr().out
    ratios = sorted(sum(r["backward"].values()) / sum(r["forward"].values()) for r in runs)
    assert f"a backward costs {ratios[1]:.2f} forwards" in out
    conv = sorted(r["backward"]["convolution"] / r["forward"]["convolution"] for r in runs)[1]
    assert f"{conv:5.2f}x its forward" in next(line for line in out.splitlines() if "convolution" in line)


def test_the_gpu_wheels_are_pinned_where_the_tests_take_their_versions_and_cover_what_diffusers_needs():
    """`bash dev.sh gpu-wheels` carries diffusers and those of its needs that the GPU machine's image lacks, at
    the versions requirements-dev.txt pins (what the tests and the CPU numbers ran with), so the GPU rows build
    the same UNets; with what the image has (bench/gpu_perf.sh imports diffusers there first), nothing is missing."""
    import re
    from importlib.metadata import requires, version
    from pathlib import Path

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    root = Path(__file__).resolve().parents[1]
    block = (root / "dev.sh").read_text().split("gpu-wheels)")[1].split(";;")[0]
    carried = re.search(r"for name in ([\w\s-]+); do", block).group(1).split()
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (root / "requirements-dev.txt").read_text(), re.M))
    assert all(name in pins and version(name) == pins[name] for name in carried), carried
    needs = [Requirement(r) for name in carried for r in requires(name) or [] if "extra ==" not in r]
    # the GPU image's packages, as the device library (.library/device/KINDS.md) recorded them on 2026-11-17,
    # with the versions it saw where diffusers bounds them (None: no version recorded, diffusers sets no bound)
    image = {"filelock": None, "huggingface-hub": "1.33.0", "numpy": None, "regex": None, "requests": None,
             "safetensors": "0.8.0", "pillow": None}
    ours = {norm(n) for n in carried}
    missing = {norm(r.name) for r in needs} - set(image) - ours
    assert not missing, missing
    for need in (r for r in needs if norm(r.name) not in ours):
        seen = image[norm(need.name)]
        bounds = [s for s in need.specifier if s.operator != "!="]  # regex!=2019.12.17 excludes one old release
        assert not bounds or (seen is not None and need.specifier.contains(seen)), (str(need), seen)


def _dry_run_steps(script: str, tmp_path) -> dict[str, list[str]]:
    """The steps bench/<script> would run on the GPU machine, by name, each as the argument list after the
    interpreter: bash runs the script itself with DRY_RUN=1 (its loops, arrays and branches expanded as on the
    device), and each step prints its command instead of running it."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(root / "bench" / script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    steps = {}
    for line in run.stdout.splitlines():
        if ": would run: " in line:
            name, command = line.split(": would run: ", 1)
            words = shlex.split(command)
            steps[name] = words[words.index(sys.executable) + 1:]
    assert steps and run.stdout.rstrip().endswith("PASS"), run.stdout
    return steps


def test_every_command_of_the_gpu_script_parses(capsys, tmp_path):
    """The GPU run happens rarely and has minutes: every bench command bench/gpu_perf.sh runs must at least be
    accepted by its command line (options, choices, method names), on any machine."""
    from bench import adjust, saved

    steps = _dry_run_steps("gpu_perf.sh", tmp_path)
    assert list(steps) == ["sd15", "saved", "adjust_per_sample_polyak", "adjust_per_sample_polyak_checkpointed",
                           "sdxl", "adjust_batch_wise", "adjust_per_sample_polyak_step0.1_hold2"], steps
    assert all(words[:2] == ["-m", "bench"] for words in steps.values()), steps
    commands = [words[2:] for words in steps.values()]
    assert all("--out" not in c or c[c.index("--out") + 1] == str(tmp_path) for c in commands), commands
    parsers = {"perf": perf.parse_args, "saved": saved.parse_args, "adjust": adjust.parse_args}
    for command in commands:
        args = parsers[command[0]](command[1:])
        # no --device: the default, the GPU where torch sees one (gpu_lib.sh picks such a python)
        assert args.dtype == "float16" and ("--device" not in command or args.device == "cuda"), command
    assert {c[c.index("--method") + 1] for c in commands if c[0] == "adjust"} == {
        "per_sample_polyak", "per_sample_polyak_checkpointed", "batch_wise", "per_sample_polyak_step0.1_hold2"}
    held = adjust.parse_args(steps["adjust_per_sample_polyak_step0.1_hold2"][3:])
    assert held.max_iterations == 2 and held.target_ratio == 0.01, held  # the 2 iterations most lab images take
    assert saved.parse_args(next(c for c in commands if c[0] == "saved")[1:]).profile == 3
    with pytest.raises(SystemExit):
        perf.parse_args(["--methods", "plain,per_sample_nonsense"])
    err = capsys.readouterr().err
    assert "--methods: unknown per_sample_nonsense" in err and perf.PER_SAMPLE_FORMS in err, err
    for parse, option, value in [(saved.parse_args, "--profile", "-1"), (saved.parse_args, "--time-repeats", "2.5"),
                                 (perf.parse_args, "--threads", "-1"), (adjust.parse_args, "--threads", "two"),
                                 (saved.parse_args, "--threads", "-2"), (perf.parse_args, "--batch", "0"),
                                 (perf.parse_args, "--steps", "-5"), (perf.parse_args, "--repeats", "0"),
                                 (adjust.parse_args, "--steps", "0"), (adjust.parse_args, "--repeats", "0"),
                                 (adjust.parse_args, "--batch", "1.5"), (saved.parse_args, "--latent", "0"),
                                 (perf.parse_args, "--max-iterations", "0"), (adjust.parse_args, "--max-iterations", "-1")]:
        with pytest.raises(SystemExit):
            parse([option, value])
        assert f"argument {option}: {value!r} is not a count" in capsys.readouterr().err, (option, value)
    assert perf.parse_args(["--threads", "0"]).threads == 0 and saved.parse_args(["--profile", "0"]).profile == 0


def test_bench_device_names_the_option_for_a_bad_name_and_for_a_gpu_this_torch_cannot_see(capsys):
    """--device takes cpu, cuda and cuda:N (a GPU script's commands parse on any machine); a GPU this torch does
    not see stops the model build with a message naming --device, not a CUDA assertion."""
    from bench import jacobian, models

    for value in ("gpu", "mps", "cuda:x"):
        with pytest.raises(SystemExit):
            jacobian.parse_args(["--device", value])
        assert f"argument --device: {value!r}: allowed are cpu, cuda and cuda:N" in capsys.readouterr().err, value
    assert perf.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit, match=f"--device {missing}: this"):
        models.build("tiny", missing)


def test_the_ops_benchmark_of_the_gpu_check_parses_and_refuses_counts_that_measure_nothing(tmp_path):
    """bench/gpu_check.sh runs bench_ops.py once, late in a short GPU run: its command line must be accepted here,
    and a round count of 0 (a median of nothing) or a negative thread count refused before any work."""
    from bench import bench_ops

    steps = _dry_run_steps("gpu_check.sh", tmp_path)
    assert list(steps) == ["build", "test_ops", "bench"], steps
    assert steps["test_ops"][:3] == ["-m", "pytest", "tests/test_ops.py"], steps
    assert steps["bench"][0] == "bench/bench_ops.py", steps
    args = bench_ops.parse_args(steps["bench"][1:])
    assert (args.device, args.unet_device, args.rounds, args.name) == ("all", "cuda", 5, "ops_gpu")
    for option, value in [("--rounds", "0"), ("--rounds", "-3"), ("--threads", "-1"), ("--threads", "1.5")]:
        with pytest.raises(SystemExit):
            bench_ops.parse_args([option, value])
    assert bench_ops.parse_args(["--rounds", "1", "--threads", "0"]).rounds == 1
