"""The benchmark harness's names: what each per_sample* bench name runs, and that the lab efficacy a bench row
carries was measured with the same settings (bench/perf.py, memsafe/lab/evaluate.py)."""

import pytest

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


@pytest.mark.parametrize("name", ["per_sample_polyak_fd", "per_sample_exact_one", "per_sample_budgetx", "batch_wise"])
def test_a_name_outside_the_per_sample_grammar_is_refused(name):
    with pytest.raises(ValueError, match="per_sample\\[_fd\\]\\[_polyak\\]"):
        perf.per_sample_variant(name, BASE)


def test_the_lab_efficacy_a_bench_row_carries_was_measured_with_the_settings_the_row_times():
    """A bench row shows the replication and alignment of a lab.json row: both must run the same config (a
    checkpointed or one-image-per-call bench variant gives the images of the lab variant without it)."""
    lab = {m.label: m for m in variant_methods()}
    for name, (section, label) in perf.LAB_EFFICACY.items():
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
