import math

import pytest

import memsafe
from memsafe import ConfigError, MitigationConfig
from memsafe.config import INFOTEXT_BASELINE, PRESETS


def test_defaults_are_the_papers_sd1_numbers_at_4x64x64():
    cfg = MitigationConfig()
    # Han et al. 2025, official code defaults (SD v1.4, DDIM 50, CFG 7).
    assert (cfg.rho, cfg.gamma, cfg.iterations, cfg.uncond_steps) == (50.0, 0.7, 2, 5)
    assert (cfg.lr, cfg.target, cfg.max_iterations, cfg.weight_decay) == (0.01, 0.9, 1000, 0.01)
    scaled = cfg.scaled(4 * 64 * 64)
    assert (scaled.rho, scaled.target, scaled.risk_threshold, scaled.scale) == (50.0, 0.9, 0.9, 1.0)


@pytest.mark.parametrize(("shape", "scale"), [((4, 128, 128), 2.0), ((4, 96, 96), 1.5), ((4, 32, 32), 0.5)])
def test_norm_parameters_scale_with_sqrt_of_latent_size(shape, scale):
    cfg = MitigationConfig()
    numel = shape[0] * shape[1] * shape[2]
    scaled = cfg.scaled(numel)
    assert scaled.scale == pytest.approx(scale)
    assert scaled.rho == pytest.approx(50.0 * scale)
    assert scaled.target == pytest.approx(0.9 * scale)
    assert scaled.risk_threshold == pytest.approx(0.9 * scale)
    # lr, gamma and counts are per element or unitless: not scaled
    off = MitigationConfig(scale_with_size=False).scaled(numel)
    assert (off.rho, off.target, off.scale) == (50.0, 0.9, 1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "fast"),
        ("rho", 0),
        ("rho", -1.0),
        ("gamma", float("nan")),
        ("iterations", 0),
        ("iterations", 2.5),
        ("uncond_steps", -1),
        ("lr", float("inf")),
        ("target", -0.1),
        ("max_iterations", 10**9),
        ("weight_decay", 2.0),
        ("auto_method", "auto"),
        ("scale_with_size", "maybe"),
        ("rho", "abc"),
        ("iterations", True),
        ("hold_norm_steps", -1),
        ("hold_norm_steps", 1.5),
        ("hold_norm_steps", 10**5),
    ],
)
def test_out_of_range_values_raise_config_error_naming_field_and_range(field, value):
    with pytest.raises(ConfigError) as info:
        MitigationConfig(**{field: value})
    assert info.value.field == field
    assert field in str(info.value) and "allowed" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_fields_are_rejected_with_the_known_ones_listed():
    with pytest.raises(ConfigError, match="unknown field.*known fields: method"):
        MitigationConfig.from_dict({"method": "per_sample", "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="unknown"):
        MitigationConfig().replace(tgt=1.0)
    with pytest.raises(ConfigError, match="unknown"):
        MitigationConfig.from_string("method=auto;foo=1")


def test_string_round_trip_is_exact_and_compact():
    cfg = MitigationConfig(
        method="auto",
        lr=0.0123456789,
        target=1.25,
        auto_method="batch_wise",
        scale_with_size=False,
        iterations=3,
    )
    text = cfg.to_string()
    assert "," not in text and "\n" not in text  # safe inside an A1111 infotext
    assert "rho" not in text  # defaults are left out
    assert MitigationConfig.from_string(text) == cfg
    # the per-sample step's default (polyak) is not the infotext baseline's (adamw), so it is always written
    assert MitigationConfig().to_string() == "method=per_sample;optimizer=polyak"
    assert MitigationConfig(optimizer="adamw").to_string() == "method=per_sample"
    assert MitigationConfig.from_string(" method=off ; ") == MitigationConfig(method="off", optimizer="adamw")


def test_an_infotext_written_before_the_default_step_changed_reads_back_as_adamw():
    # memsafe 0.1.0 (default AdamW) wrote only the fields that differed from its defaults: no optimizer field
    old = MitigationConfig.from_string("method=per_sample;target=1.2")
    assert old.optimizer == "adamw" and old.target == 1.2 and old.hold_norm_steps == 0  # steps as they were
    assert old.to_string() == "method=per_sample;target=1.2"  # and it is written back unchanged
    assert MitigationConfig().optimizer == "polyak"
    for cfg in (MitigationConfig(), MitigationConfig(method="auto", max_step=0.02),
                MitigationConfig(method="batch_wise", optimizer="adamw", gradient="finite_difference"),
                MitigationConfig(max_step=0.1, hold_norm_steps=2)):
        assert MitigationConfig.from_string(cfg.to_string()) == cfg


def test_the_infotext_baseline_names_every_field_and_is_valid():
    assert set(INFOTEXT_BASELINE) == set(MitigationConfig().to_dict())
    MitigationConfig.from_dict(INFOTEXT_BASELINE)


def test_dict_round_trip_and_string_values_from_the_api():
    cfg = MitigationConfig(method="batch_wise", rho=20.0, uncond_steps=3)
    assert MitigationConfig.from_dict(cfg.to_dict()) == cfg
    assert MitigationConfig.from_dict({"iterations": "4", "scale_with_size": "false"}).iterations == 4
    assert MitigationConfig.from_dict({"iterations": 4.0}).iterations == 4
    with pytest.raises(ConfigError, match="mapping"):
        MitigationConfig.from_dict(["method", "auto"])
    with pytest.raises(ConfigError, match="key=value"):
        MitigationConfig.from_string("per_sample")
    with pytest.raises(ConfigError):
        MitigationConfig.from_string("")


def test_presets_are_valid_and_documented():
    assert set(PRESETS) >= {"sd1", "sd2", "sd2-v", "sdxl"}
    assert MitigationConfig.from_preset("sd1") == MitigationConfig()
    sd2 = MitigationConfig.from_preset("sd2")
    # the paper's SD2 numbers were taken in the Euler sampler's space x = z * sigma_max (about 14.61)
    assert sd2.rho * 14.614642 == pytest.approx(30.0, rel=1e-3)
    assert sd2.lr * 14.614642 == pytest.approx(0.1, rel=1e-3)
    assert (sd2.iterations, sd2.uncond_steps) == (4, 4)
    assert PRESETS["sd1"].calibrated and PRESETS["sd2"].calibrated
    assert not PRESETS["sdxl"].calibrated and not PRESETS["sd2-v"].calibrated
    assert MitigationConfig.from_preset("sdxl", method="auto").method == "auto"
    with pytest.raises(ConfigError, match="preset"):
        MitigationConfig.from_preset("sd3")
    assert math.isclose(MitigationConfig.from_preset("sdxl").scaled(4 * 128 * 128).target, 1.8)


def test_config_is_immutable_and_public_names_exist():
    cfg = MitigationConfig()
    with pytest.raises(AttributeError):
        cfg.rho = 3.0  # type: ignore[misc]
    for name in (
        "MitigationConfig",
        "ConfigError",
        "adjust_noise",
        "AdjustResult",
        "risk_score",
        "guidance_from_denoiser",
        "guidance_from_eps_model",
    ):
        assert hasattr(memsafe, name)
