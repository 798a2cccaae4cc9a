"""MemSafe in a real, running A1111 WebUI, through its HTTP API (skipped unless MEMSAFE_WEBUI_URL is set).

Start a WebUI with MemSafe installed and ``--api`` (any model; a small random-weight one answers in seconds), then:
``MEMSAFE_WEBUI_URL=http://127.0.0.1:7860 .venv/bin/python -m pytest tests/test_live_webui.py``. The checks hold
for any model: they compare MemSafe against the same WebUI with it off, and read what MemSafe reports; none
depends on the numbers a model gives. Requests are small (128 px, 8 steps) but run the model: on a CPU with full
SD weights, expect minutes. Needs pytest and the standard library only, not memsafe or torch.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

URL = os.environ.get("MEMSAFE_WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="set MEMSAFE_WEBUI_URL to a running WebUI started with --api")

# PNGs without their infotext chunk: equal images are then equal bytes (the infotexts still come in ``info``)
BASE_REQUEST = {"prompt": "a red circle", "steps": 8, "width": 128, "height": 128, "batch_size": 2, "seed": 1,
                "sampler_name": "Euler a", "cfg_scale": 7, "override_settings": {"enable_pnginfo": False}}


def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(URL + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1800) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def txt2img(memsafe: dict[str, Any] | None = None, **fields: Any) -> tuple[int, Any]:
    body: dict[str, Any] = {**BASE_REQUEST, **fields}
    if memsafe is not None:
        body["alwayson_scripts"] = {"memsafe": {"args": [memsafe]}}
    return post("/sdapi/v1/txt2img", body)


def generated(memsafe: dict[str, Any] | None = None, **fields: Any) -> tuple[list[str], dict[str, Any]]:
    """The images (base64 PNG) and the parsed ``info`` of a request that must succeed."""
    status, response = txt2img(memsafe, **fields)
    assert status == 200, response
    return response["images"], json.loads(response["info"])


def custom(method: str, **fields: Any) -> dict[str, Any]:
    return {"enabled": True, "method": method, "preset": "custom", **fields}


def per_image_results(info: dict[str, Any], count: int) -> list[str]:
    results = info["extra_generation_params"]["MemSafe result"]
    assert isinstance(results, list) and len(results) == count
    for result, text in zip(results, info["infotexts"]):
        assert f"MemSafe result: {result}" in text  # each image's own, not the job's callables or another's
    assert "bound method" not in "".join(info["infotexts"])
    return results


def test_off_is_identical_to_no_memsafe():
    plain, _ = generated()
    off, info = generated({"enabled": False, "method": "per_sample"})
    assert off == plain and "MemSafe" not in "".join(info["infotexts"])


def test_batch_wise_over_two_batches_reports_each_image():
    _, info = generated({"enabled": True, "method": "batch_wise"}, n_iter=2)
    results = per_image_results(info, 4)
    assert all(r.startswith("batch_wise risk ") and "->" in r for r in results)  # risk after: the first step's
    assert [f"Seed: {s}," in t for s, t in zip(range(1, 5), info["infotexts"])] == [True] * 4


def test_the_unconditional_first_steps_change_the_image():
    without, _ = generated(custom("batch_wise", uncond_steps=0))
    with_steps, _ = generated(custom("batch_wise", uncond_steps=4))
    assert without != with_steps


@pytest.mark.parametrize("sampler_name", ["Euler a", "DDIM"])
def test_per_sample_adjusts_every_image(sampler_name):
    _, info = generated(custom("per_sample", target=0.0, max_iterations=2), sampler_name=sampler_name, seed=11)
    results = per_image_results(info, 2)
    assert all(r.startswith("per_sample risk ") and r.split(" it ")[1].startswith("2") for r in results)
    warnings = info["extra_generation_params"]["MemSafe warning"]  # target 0 cannot be reached
    assert len(warnings) == 2 and all(w.startswith("still at risk") for w in warnings)


def test_auto_adjusts_above_its_threshold_and_leaves_the_images_below_it_as_they_were():
    plain, _ = generated(seed=31)
    adjusted, info = generated(custom("auto", risk_threshold=0.0, target=0.0, max_iterations=2), seed=31)
    assert all(r.startswith("per_sample ") for r in per_image_results(info, 2)) and adjusted != plain
    left, info = generated(custom("auto", risk_threshold=50.0), seed=31)
    assert all(r.startswith("none ") for r in per_image_results(info, 2)) and left == plain


def test_the_held_norm_applies_with_a_preset_in_both_argument_forms():
    """hold_norm_steps is set by no preset: it counts with preset sd1, by name and in its positional slot."""
    order = memsafe_info()["arg_order"]
    named = {"enabled": True, "method": "per_sample", "preset": "sd1", "max_iterations": 2}
    free, _ = generated({**named, "target": 0.0}, seed=41)
    held, info = generated({**named, "target": 0.0, "hold_norm_steps": 2}, seed=41)
    assert all("hold_norm_steps=2" in text for text in info["infotexts"]), info["infotexts"][0]
    # target 0: every image takes both steps, held, so it differs from free steps
    assert all(r.split(" it ")[1].startswith("2") for r in per_image_results(info, 2)) and held != free
    # positional with a preset only the preset-free slots count: the preset's target and its cap of 1000
    # iterations hold, which a model whose risk stays above the target (a random one) takes hours to reach
    positional = [named.get(name) for name in order]
    positional[order.index("hold_norm_steps")] = 2
    status, response = interrupted_after(3.0, lambda: txt2img(None, seed=41,
                                                              alwayson_scripts={"memsafe": {"args": positional}}))
    assert status == 200, response
    infotexts = json.loads(response["info"])["infotexts"]
    assert all("hold_norm_steps=2" in text for text in infotexts), infotexts[0]


def interrupted_after(seconds: float, request: Callable[[], tuple[int, Any]]) -> tuple[int, Any]:
    """What ``request`` answered, run in a thread with Interrupt sent ``seconds`` after its start. The job is
    optimizing by then (or queued behind another: the interrupt then waits for it); one that has already ended
    is not touched (the WebUI clears the flag when the next job begins)."""
    done: dict[str, tuple[int, Any]] = {}
    job = threading.Thread(target=lambda: done.setdefault("response", request()))
    job.start()
    time.sleep(seconds)
    post("/sdapi/v1/interrupt", {})
    job.join(timeout=600)
    assert not job.is_alive(), "the job did not stop after Interrupt"
    return done["response"]


def memsafe_info() -> dict[str, Any]:
    """What MemSafe's info route answers (version, host, arg_order)."""
    with urllib.request.urlopen(URL + "/memsafe/v1/info", timeout=60) as response:
        return json.loads(response.read())


def webui_host() -> str:
    """"a1111" or "forge", as MemSafe's info route says."""
    return memsafe_info()["host"]


def test_hires_fix_keeps_working():
    # Forge's API leaves hr_additional_modules None unless given, and its hires pass then fails (processing.py L1405)
    forge = {"hr_additional_modules": ["Use same choices"]} if webui_host() == "forge" else {}
    images, info = generated({"enabled": True, "method": "batch_wise"}, batch_size=1, enable_hr=True, hr_scale=1.5,
                             hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=3, **forge)
    assert len(images) == 1 and per_image_results(info, 1)[0].startswith("batch_wise")


@pytest.mark.parametrize(("memsafe", "fields", "field"), [
    ({"enabled": True, "method": "per_sampel"}, {}, "method"),
    ({"enabled": True, "method": "per_sample"}, {"cfg_scale": 1}, "cfg_scale"),
    (custom("per_sample", max_iterations=10**6), {}, "max_iterations"),
])
def test_bad_requests_are_refused_before_the_job_naming_the_field(memsafe, fields, field):
    status, response = txt2img(memsafe, **fields)
    assert status == 422 and response["field"] == field and field in response["detail"], response


def test_info_and_risk_routes():
    info = memsafe_info()
    assert info["version"] and info["arg_order"][0] == "enabled"
    status, risk = post("/memsafe/v1/risk", {"prompt": "a red circle", "seeds": [1, 2], "width": 128, "height": 128})
    assert status == 200 and len(risk["risk"]) == 2 and len(risk["at_risk"]) == 2


def test_per_sample_gradient_as_the_host_allows():
    """Forge's UNet weights are inference tensors: per-sample is forward-only there, and autograd is refused."""
    host = webui_host()
    status, response = txt2img(custom("per_sample", gradient="autograd", target=0.0, max_iterations=1), batch_size=1)
    if host == "forge":
        assert status == 422 and response["field"] == "gradient", response
        _, info = generated(custom("per_sample", target=0.0, max_iterations=1), batch_size=1)
        assert "gradient=finite_difference" in info["infotexts"][0]
    else:
        assert host == "a1111" and status == 200, response


def test_interrupt_stops_the_optimizer():
    status, response = interrupted_after(3.0, lambda: txt2img(custom("per_sample", target=0.0, max_iterations=10000),
                                                              batch_size=1, seed=77))
    assert status == 200
    assert "MemSafe result: interrupted" in json.loads(response["info"])["infotexts"][0]
