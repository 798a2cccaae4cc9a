"""MemSafe for the AUTOMATIC1111 WebUI: the txt2img accordion and the hook methods. Thin: the work is done by
memsafe.hosts.a1111 (per job) and memsafe.hosts.a1111_app (settings, XYZ axes, API routes)."""

import os
import sys

_EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_ROOT not in sys.path:  # the WebUI loads this file by path; our package lives beside it
    sys.path.insert(0, _EXTENSION_ROOT)

import gradio as gr  # noqa: E402
from modules import processing, script_callbacks, scripts, shared  # noqa: E402

from memsafe.config import PRESETS, MitigationConfig  # noqa: E402
from memsafe.errors import ConfigError  # noqa: E402
from memsafe.hosts import a1111, a1111_app  # noqa: E402
from memsafe.hosts.forge import FORGE_GRADIENT  # noqa: E402
from memsafe.hosts.webui_args import FIELD_ORDER, PRESET_CHOICES, PRESET_FREE, UI_METHODS  # noqa: E402

COSTS = {
    "auto": "Auto: one extra model evaluation per image to score its risk; only images at risk are adjusted "
            "(with the method chosen under Advanced).",
    "batch_wise": "Batch-wise: 2 x Iterations extra evaluations per image, no backprop (paper: +8.6% time, "
                  "same VRAM), then the first steps sample without the prompt.",
    "per_sample": "Per-sample: gradient steps with backprop through the UNet until each image reaches its target; "
                  "the strongest protection. The default Polyak step needs about 3 of them (about +11% time at 50 "
                  "steps, measured on a CPU); with 2 Polyak steps that keep the noise's norm and a largest step of 0.1 "
                  "(Advanced) about 2.6, a little weaker on the hardest copies; the paper's AdamW (Advanced) about "
                  "20 (paper: +51% time, +172% VRAM).",
}
FIELD_LABELS = {
    "rho": ("Rho (batch-wise probe radius)", 0.1, 200.0, 0.1),
    "gamma": ("Gamma (batch-wise step)", 0.01, 5.0, 0.01),
    "iterations": ("Iterations M (batch-wise)", 1, 20, 1),
    "uncond_steps": ("Unconditional first steps K (batch-wise)", 0, 30, 1),
    "lr": ("Learning rate (per-sample, AdamW)", 0.0005, 0.5, 0.0005),
    "target": ("Target ||eps_cond - eps_uncond|| (per-sample)", 0.0, 50.0, 0.01),
    "max_iterations": ("Max iterations per image (per-sample)", 1, 10000, 1),
    "weight_decay": ("AdamW weight decay (per-sample)", 0.0, 1.0, 0.001),
    "risk_threshold": ("Risk threshold (auto)", 0.0, 50.0, 0.01),
    "fd_radius": ("Finite-difference probe distance (per-sample, forward-only gradient)", 0.01, 50.0, 0.01),
    "max_step": ("Largest Polyak step (per-sample, RMS per element)", 0.001, 1.0, 0.001),
    "hold_norm_steps": ("Polyak steps that keep the noise's norm (per-sample; 0: off)", 0, 20, 1),
}
FORGE_PER_SAMPLE_COST = ("Per-sample (Forge: forward-only gradient, no backprop): two UNet passes per step until "
                         "each image reaches its target, no extra VRAM; weaker prompt alignment than backprop "
                         "(see the README).")
MAIN_FIELDS = ("target", "risk_threshold")


def _preset_values(name):
    base = MitigationConfig.from_preset(name) if name in PRESETS else MitigationConfig()
    return [getattr(base, field) for field in FIELD_ORDER]


def _from_infotext(field):
    """Infotext -> UI value for one field (PNG Info / Send to txt2img): the MemSafe entry is the compact config."""

    def read(params):
        text = params.get("MemSafe")
        if field == "enabled":
            return bool(text) and not str(text).startswith("FAILED")
        if not text:
            return gr.update()
        try:
            config = MitigationConfig.from_string(str(text))
        except ConfigError:
            return gr.update()
        if field == "preset":
            return "custom"  # the exact values, whatever preset produced them
        return getattr(config, field)

    return read


class _CheckboxAccordion:
    """Before A1111 1.7 (no InputAccordion): an accordion with an "Enable MemSafe" checkbox inside."""

    def __init__(self, elem_id):
        self.elem_id = elem_id

    def __enter__(self):
        self.accordion = gr.Accordion("MemSafe", open=False)
        self.accordion.__enter__()
        return gr.Checkbox(False, label="Enable MemSafe", elem_id=self.elem_id)

    def __exit__(self, *exc):
        return self.accordion.__exit__(*exc)


def _enable_accordion(elem_id):
    """The MemSafe accordion whose header checkbox enables it (like Hires. fix; ui_components.InputAccordion)."""
    try:
        from modules.ui_components import InputAccordion
    except ImportError:
        return _CheckboxAccordion(elem_id)
    return InputAccordion(False, label="MemSafe", elem_id=elem_id)


class MemSafeScript(scripts.Script):
    def __init__(self):
        super().__init__()
        self.cache = a1111.NoiseCache()

    def title(self):
        return "MemSafe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        if is_img2img:
            with gr.Accordion("MemSafe", open=False, elem_id=self.elem_id("accordion")):
                gr.HTML("<p>MemSafe adjusts the initial noise of txt2img generations; in img2img it does nothing.</p>")
            return []
        default_method = getattr(shared.opts, "memsafe_default_method", "auto")
        defaults = dict(zip(FIELD_ORDER, _preset_values("sd1")))
        with _enable_accordion(self.elem_id("enabled")) as enabled:
            gr.HTML("<p>Avoid reproducing memorized training images by adjusting the initial noise "
                    "(Han et al., NeurIPS 2025). Same seed and settings, same image.</p>")
            with gr.Row():
                method = gr.Radio(list(UI_METHODS), value=default_method, label="Method",
                                  elem_id=self.elem_id("method"))
                preset = gr.Dropdown(list(PRESET_CHOICES), value="auto", label="Preset (auto: by model)",
                                     elem_id=self.elem_id("preset"))
            on_forge = a1111.is_forge()
            costs = {**COSTS, "per_sample": FORGE_PER_SAMPLE_COST} if on_forge else COSTS
            cost = gr.HTML(f"<p>{costs[default_method]}</p>")
            gr.HTML("<p>The values below apply with preset <b>custom</b>; a preset fills them in.</p>")
            fields = {}
            with gr.Row():
                for name in MAIN_FIELDS:
                    label, low, high, step = FIELD_LABELS[name]
                    fields[name] = gr.Slider(low, high, value=defaults[name], step=step, label=label,
                                             interactive=False, elem_id=self.elem_id(name))
            with gr.Accordion("Advanced", open=False):
                for name in FIELD_ORDER:
                    if name in MAIN_FIELDS or name not in FIELD_LABELS:
                        continue
                    label, low, high, step = FIELD_LABELS[name]
                    fields[name] = gr.Slider(low, high, value=defaults[name], step=step, label=label,
                                             interactive=name in PRESET_FREE, elem_id=self.elem_id(name))
                fields["auto_method"] = gr.Radio(["per_sample", "batch_wise"], value=defaults["auto_method"],
                                                 label="Method for images at risk (auto)", interactive=False,
                                                 elem_id=self.elem_id("auto_method"))
                fields["scale_with_size"] = gr.Checkbox(defaults["scale_with_size"], interactive=False,
                                                        label="Scale rho, target and threshold with image size",
                                                        elem_id=self.elem_id("scale_with_size"))
                if on_forge:  # its UNet weights are inference tensors: no backward pass (forge.py)
                    fields["gradient"] = gr.Radio([FORGE_GRADIENT], value=FORGE_GRADIENT,
                                                  label="Per-sample gradient (Forge: finite_difference only, no "
                                                        "backprop through its UNet)", interactive=False,
                                                  elem_id=self.elem_id("gradient"))
                else:
                    fields["gradient"] = gr.Radio(["autograd", "finite_difference"], value=defaults["gradient"],
                                                  label="Per-sample gradient (finite_difference: no backprop, "
                                                        "much less VRAM)", interactive=True,
                                                  elem_id=self.elem_id("gradient"))
                fields["optimizer"] = gr.Radio(["adamw", "polyak"], value=defaults["optimizer"],
                                               label="Per-sample step (polyak, the default: step length from the "
                                                     "target, a few iterations; adamw: the paper's optimizer)", interactive=True,
                                               elem_id=self.elem_id("optimizer"))
        ordered = [fields[name] for name in FIELD_ORDER]

        def on_preset(name):
            editable = name == "custom"
            values = _preset_values("sd1" if name in ("auto", "custom") else name)
            if editable:
                return [gr.update(interactive=True) for _ in ordered]
            # the preset's values; fields no preset sets keep what the user chose
            return [gr.update(interactive=True) if name in PRESET_FREE else gr.update(value=v, interactive=False)
                    for name, v in zip(FIELD_ORDER, values)]

        preset.change(on_preset, inputs=[preset], outputs=ordered, show_progress=False)
        method.change(lambda m: f"<p>{costs.get(m, '')}</p>", inputs=[method], outputs=[cost], show_progress=False)
        components = [enabled, method, preset, *ordered]
        names = ["enabled", "method", "preset", *FIELD_ORDER]
        self.infotext_fields = [(component, _from_infotext(name)) for component, name in zip(components, names)]
        self.paste_field_names = ["MemSafe"]
        return components

    def process(self, p, *args):
        if isinstance(p, processing.StableDiffusionProcessingTxt2Img):
            a1111.start_job(p, args, self.cache)

    def process_batch(self, p, *args, **kwargs):
        a1111.before_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        a1111.before_sampling(p, kwargs["noise"], kwargs["c"], kwargs["uc"])

    def postprocess_batch(self, p, *args, **kwargs):
        a1111.before_image(p, batch_index=0)

    def postprocess_image(self, p, pp, *args):
        a1111.before_image(p)

    def postprocess(self, p, processed, *args):
        a1111.finish_job(p, processed)


script_callbacks.on_ui_settings(a1111_app.on_ui_settings)
script_callbacks.on_before_ui(a1111_app.on_before_ui)
script_callbacks.on_app_started(a1111_app.on_app_started)
# The XYZ plot builds its axis list when its UI is built; in API-only mode that happens before on_before_ui, so
# the axes are also added right now (the built-in xyz_grid script is loaded before extensions' scripts).
a1111_app.on_before_ui()
