"""The script's argument formats (positional and dict) and the API guard that refuses bad ones before a job."""

import asyncio
import json

import pytest

from memsafe import ConfigError, MitigationConfig
from memsafe.config import PRESETS
from memsafe.hosts import api_guard
from memsafe.hosts.webui_args import ARG_NAMES, PRESET_FREE, parse_script_args


def test_positional_arguments_in_the_documented_order():
    assert ARG_NAMES[:3] == ("enabled", "method", "preset")
    request = parse_script_args([True, "per_sample", "custom", 40.0, 0.5, 3, 4, 0.02, 1.1, 100, 0.0, 2.0,
                                 "batch_wise", False])
    config = request.resolve("sdxl")  # custom: the family does not matter
    assert config == MitigationConfig(method="per_sample", rho=40.0, gamma=0.5, iterations=3, uncond_steps=4,
                                      lr=0.02, target=1.1, max_iterations=100, weight_decay=0.0,
                                      risk_threshold=2.0, auto_method="batch_wise", scale_with_size=False)


def test_missing_trailing_arguments_and_presets():
    assert parse_script_args([True]).resolve("sd1") == MitigationConfig(method="auto")
    sdxl = parse_script_args([True, "batch_wise"]).resolve("sdxl")  # preset auto: by the model's family
    assert sdxl == MitigationConfig.from_preset("sdxl", method="batch_wise")
    # field values count only with preset custom (the UI always sends them)
    assert parse_script_args([True, "auto", "sd2", 1.0]).resolve("sd1") == MitigationConfig.from_preset(
        "sd2", method="auto")
    # ... except the fields no preset sets (how per-sample steps), which apply with every preset
    args = dict.fromkeys(ARG_NAMES)
    args.update(enabled=True, method="per_sample", preset="sd2", rho=1.0, optimizer="polyak", max_step=0.1,
                hold_norm_steps=2)
    assert ARG_NAMES[-1] == "hold_norm_steps"  # the newest field comes last: older positional calls still fit
    assert parse_script_args(list(args.values())).resolve("sd1") == MitigationConfig.from_preset(
        "sd2", method="per_sample", optimizer="polyak", max_step=0.1, hold_norm_steps=2)
    for preset in PRESETS.values():
        assert not set(preset.values) & set(PRESET_FREE), preset.name


def test_dict_form_puts_fields_on_top_of_the_preset():
    request = parse_script_args([{"enabled": True, "method": "per-sample", "preset": "sdxl", "target": 1.2}])
    assert request.resolve("sd1") == MitigationConfig.from_preset("sdxl", method="per_sample", target=1.2)


def test_dict_in_slot_0_ignores_the_defaults_the_api_fills_in_after_it():
    # api.py L315-361: the WebUI pads the request's args with the UI defaults of the other slots
    padded = [{"enabled": True, "method": "per_sample", "target": 0.5}, "auto", "sd1", 50.0, 0.7, 2]
    assert parse_script_args(padded).resolve("sd1") == MitigationConfig(method="per_sample", target=0.5)


def test_disabled_is_off_whatever_else_is_sent():
    assert not parse_script_args([]).enabled
    assert not parse_script_args([False, "nonsense", 17]).enabled
    assert not parse_script_args([{"enabled": False, "rho": -5}]).enabled


@pytest.mark.parametrize(("args", "field"), [
    ([{"enabled": True, "learning_rate": 0.1}], "learning_rate"),
    ([{"enabled": True, "rho": "big"}], "rho"),
    ([{"enabled": True, "method": "fast"}], "method"),
    ([{"enabled": True, "preset": "sd3"}], "preset"),
    ([{"enabled": "yes"}], "enabled"),
    ([True, "auto", "custom", -1.0], "rho"),
    ([{"enabled": True, "hold_norm_steps": -2}], "hold_norm_steps"),
    ([True] * 20, "args"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(ConfigError) as info:
        parse_script_args(args)
    assert info.value.field == field


# -- the ASGI guard, driven without any server ------------------------------------------------------------------
def call(app, path, body, method="POST", chunks=1):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    pieces = [raw[i::chunks] for i in range(chunks)] if chunks == 1 else [raw[: len(raw) // 2], raw[len(raw) // 2:]]
    messages = [{"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
                for i, piece in enumerate(pieces)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path}, receive, send))
    return sent


class Downstream:
    """The WebUI's app: records the body it receives."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_bad_memsafe_arguments_are_refused_before_the_job():
    app = Downstream()
    guard = api_guard.MemSafeApiGuard(app)
    body = {"prompt": "x", "alwayson_scripts": {"MemSafe": {"args": [{"enabled": True, "target": -2}]}}}
    sent = call(guard, "/sdapi/v1/txt2img", body)
    assert sent[0]["status"] == 422 and app.bodies == []
    error = json.loads(sent[1]["body"])
    assert error["field"] == "target" and "allowed" in error["detail"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/sdapi/v1/txt2img", {"cfg_scale": 1, "alwayson_scripts": {"memsafe": {"args": [True]}}}, "cfg_scale"),
    ("/sdapi/v1/img2img", {"alwayson_scripts": {"memsafe": {"args": [True]}}}, "enabled"),
    ("/sdapi/v1/txt2img", {"steps": 4, "alwayson_scripts": {"memsafe": {"args": [
        {"enabled": True, "method": "batch_wise", "uncond_steps": 4}]}}}, "uncond_steps"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"memsafe": [True]}}, "args"),
])
def test_requests_memsafe_cannot_serve_are_refused(path, body, field):
    sent = call(api_guard.MemSafeApiGuard(Downstream()), path, body)
    assert sent[0]["status"] == 422 and json.loads(sent[1]["body"])["field"] == field


@pytest.mark.parametrize(("memsafe", "refused"), [
    ({"enabled": True, "method": "per_sample", "gradient": "autograd"}, True),
    ({"enabled": True, "method": "auto", "gradient": "autograd"}, True),
    ({"enabled": True, "method": "per_sample"}, False),  # forward-only there unless chosen
    ({"enabled": True, "method": "batch_wise", "gradient": "autograd"}, False),  # batch-wise never backprops
])
def test_on_forge_a_per_sample_autograd_request_is_refused_naming_gradient(memsafe, refused):
    body = {"alwayson_scripts": {"memsafe": {"args": [memsafe]}}}
    sent = call(api_guard.MemSafeApiGuard(Downstream(), forge=True), "/sdapi/v1/txt2img", body)
    assert (sent[0]["status"] == 422) == refused
    if refused:
        error = json.loads(sent[1]["body"])
        assert error["field"] == "gradient" and "'finite_difference'" in error["detail"]
    assert call(api_guard.MemSafeApiGuard(Downstream()), "/sdapi/v1/txt2img", body)[0]["status"] == 200  # A1111


@pytest.mark.parametrize("body", [
    {"prompt": "x"},
    {"prompt": "x", "alwayson_scripts": {"memsafe": {"args": [False, "whatever"]}}},
    {"prompt": "x", "alwayson_scripts": {"memsafe": {"args": [{"enabled": True, "method": "per_sample"}]}}},
    b"not json at all",
])
def test_other_requests_pass_through_byte_for_byte(body):
    app = Downstream()
    sent = call(api_guard.MemSafeApiGuard(app), "/sdapi/v1/txt2img", body, chunks=2)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert app.bodies == [raw] and sent[0]["status"] == 200


def test_other_routes_are_not_read():
    app = Downstream()
    sent = call(api_guard.MemSafeApiGuard(app), "/sdapi/v1/options", {"alwayson_scripts": {"memsafe": [1]}})
    assert sent[0]["status"] == 200


def test_install_adds_the_middleware_once():
    class App:
        def __init__(self):
            self.user_middleware, self.middleware_stack = [], object()

        def add_middleware(self, cls, **options):  # Starlette's add_middleware(cls, *args, **kwargs)
            assert self.middleware_stack is None  # Starlette refuses once the stack is built
            self.user_middleware.insert(0, type("Middleware", (), {"cls": cls, "kwargs": options})())

    app = App()
    assert api_guard.install(app, forge=True) and not api_guard.install(app)
    assert len(app.user_middleware) == 1 and app.user_middleware[0].kwargs == {"forge": True}
