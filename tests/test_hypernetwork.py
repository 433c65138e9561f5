"""Hypernetworks end to end on the tiny base: learning, untouched base weights, A1111 file layout,
exact reload of both export formats, strengths, resume after SIGKILL, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamloom.errors import AdapterError, DreamloomError, RecipeError
from dreamloom.export.hypernetwork import save_hypernetwork_pt
from dreamloom.models import ARCHS, build_random, load_base
from dreamloom.models.hypernetwork import Hypernetwork, HypernetworkAttnProcessor, context_widths
from dreamloom.recipes import resolve_recipe
from dreamloom.sampling.hypernetwork import attach_hypernetworks
from dreamloom.trainers.hypernetwork import HypernetworkMethod
from dreamloom.trainers.run import export_run
from helpers import image, train_tiny

FIELDS = ["step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
          "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
          "last_layer_dropout", "optional_info"]  # A1111's Hypernetwork.save, in its order
INFO = {"step": 1, "name": "h", "sd_checkpoint": None, "sd_checkpoint_name": None, "optional_info": None}
QUICK_SAMPLES = ["sample.steps=2", "sample.images_per_prompt=1"]  # end-of-run samples: not what these test
RICH = QUICK_SAMPLES + ["train.steps=30", "hypernetwork.layer_structure=[1, 2, 2, 1]",
                        "hypernetwork.activation='swish'", "hypernetwork.layer_norm=true",
                        "hypernetwork.dropout=true", "hypernetwork.last_layer_dropout=true"]


@pytest.fixture(scope="module")
def hn_run(tmp_path_factory, subject_dir):
    """tiny-hypernetwork as shipped: [1, 2, 1], linear, fp32 exports."""
    return train_tiny(tmp_path_factory.mktemp("runs"), subject_dir, recipe="tiny-hypernetwork")


@pytest.fixture(scope="module")
def rich_run(tmp_path_factory, subject_dir):
    """Activation, layer norm and dropout all on: every layer kind in the Sequential."""
    with pytest.warns(UserWarning, match="ComfyUI"):
        return train_tiny(tmp_path_factory.mktemp("runs"), subject_dir, RICH, recipe="tiny-hypernetwork")


def layout(state: dict) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in state.items()]


def test_learns_and_only_hypernetwork_weights_change(hn_run):
    run, trained, _ = hn_run
    events = run.events()
    end = next(e for e in events if e["event"] == "end")
    assert end["loss_after"] < 0.85 * end["loss_before"], end
    # per width w, k and v MLPs of Linear(w, 2w) + Linear(2w, w): 2 * (4w^2 + 3w); tiny widths 32, 64
    assert next(e for e in events if e["event"] == "start")["trainable_params"] == 8384 + 33152

    fresh = load_base("tiny")
    for part in ("unet", "vae", "text_encoder"):
        before = getattr(fresh, part).state_dict()
        after = {k: v for k, v in getattr(trained, part).state_dict().items() if ".processor." not in k}
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), f"{part}.{key} changed"
    assert not any(p.requires_grad for p in trained.text_encoder.parameters())
    processors = list(trained.unet.attn_processors.values())
    assert len(processors) == 8 and all(isinstance(p, HypernetworkAttnProcessor) for p in processors)
    network = processors[0].networks[0]
    assert all(t.abs().sum() > 0 for k, t in network.state_dict().items() if k.endswith("bias"))  # biases start at 0


def test_pt_file_is_the_a1111_dict(hn_run):
    run, _, exports = hn_run
    assert [p.name for p in exports] == ["sks-hypernetwork.pt", "sks-hypernetwork.safetensors"]
    data = torch.load(exports[0], map_location="cpu", weights_only=True)  # ComfyUI's way of loading it
    assert list(data) == [32, 64] + FIELDS
    assert {k: data[k] for k in FIELDS} == {
        "step": 100, "name": "sks-hypernetwork", "layer_structure": [1.0, 2.0, 1.0], "activation_func": "linear",
        "is_layer_norm": False, "weight_initialization": "Normal", "sd_checkpoint": None,
        "sd_checkpoint_name": "tiny", "activate_output": False, "use_dropout": False,
        "dropout_structure": [0.0, 0.0, 0.0], "last_layer_dropout": False,
        "optional_info": data["optional_info"]}
    for width in (32, 64):
        assert isinstance(data[width], tuple) and len(data[width]) == 2
        for state in data[width]:
            assert layout(state) == [("linear.0.weight", [2 * width, width]), ("linear.0.bias", [2 * width]),
                                     ("linear.1.weight", [width, 2 * width]), ("linear.1.bias", [width])]
            assert all(t.dtype == torch.float32 for t in state.values())


def test_safetensors_file_holds_the_same_tensors_and_fields(hn_run):
    _, _, exports = hn_run
    pt = torch.load(exports[0], weights_only=True)
    flat = load_file(exports[1])
    assert len(flat) == 16
    for width in (32, 64):
        for which in (0, 1):
            for key, tensor in pt[width][which].items():
                assert torch.equal(flat[f"{width}.{which}.{key}"], tensor)
    with safe_open(exports[1], "pt") as f:
        meta = f.metadata()
    assert {k: json.loads(meta[k]) for k in FIELDS} == {k: pt[k] for k in FIELDS}


@pytest.mark.parametrize("which", [0, 1], ids=["pt", "safetensors"])
@pytest.mark.parametrize("run_name", ["hn_run", "rich_run"])
def test_export_reloads_to_the_same_image(request, run_name, which):
    _, trained, exports = request.getfixturevalue(run_name)
    expected = image(trained.pipeline())
    base = load_base("tiny")
    pipe = base.pipeline()
    attach_hypernetworks(pipe, base, [(exports[which], 1.0)])
    assert np.abs(image(pipe) - expected).max() < 1e-5
    assert np.abs(image(load_base("tiny").pipeline()) - expected).max() > 1e-2  # the hypernetwork matters


def test_portability_warnings_are_logged(rich_run):
    run, _, _ = rich_run
    messages = [e["message"] for e in run.events() if e["event"] == "warning"]
    assert len(messages) == 2
    assert "activation after the last layer" in messages[0] and "Dropout(0.3)" in messages[1]


def test_strength_zero_is_exactly_the_base_image(hn_run):
    _, _, exports = hn_run
    base = load_base("tiny")
    pipe = base.pipeline()
    attach_hypernetworks(pipe, base, [(exports[0], 0.0)])
    assert np.array_equal(image(pipe), image(load_base("tiny").pipeline()))


def test_several_hypernetworks_apply_one_after_another(hn_run, rich_run):
    def sample(specs):
        base = load_base("tiny")
        pipe = base.pipeline()
        attach_hypernetworks(pipe, base, specs)
        return image(pipe)

    one, rich = hn_run[2][0], rich_run[2][0]
    assert np.array_equal(sample([(one, 0.7), (rich, 0.0)]), sample([(one, 0.7)]))
    both = sample([(one, 1.0), (rich, 1.0)])
    assert np.abs(both - sample([(one, 1.0)])).max() > 1e-3
    assert np.abs(both - sample([(rich, 1.0), (one, 1.0)])).max() > 1e-6  # chained, so order counts


# layer_structure, activation, layer norm, dropout, last_layer_dropout, activate_output -> A1111's keys
# and shapes for width 768 (the Sequential counts activations, LayerNorms and Dropouts too).
LAYOUTS = {
    "121-linear": (([1, 2, 1], "linear", False, False, False, False), [
        ("linear.0.weight", [1536, 768]), ("linear.0.bias", [1536]),
        ("linear.1.weight", [768, 1536]), ("linear.1.bias", [768])]),
    "121-relu": (([1, 2, 1], "relu", False, False, False, False), [
        ("linear.0.weight", [1536, 768]), ("linear.0.bias", [1536]),
        ("linear.2.weight", [768, 1536]), ("linear.2.bias", [768])]),
    "121-linear-ln": (([1, 2, 1], "linear", True, False, False, False), [
        ("linear.0.weight", [1536, 768]), ("linear.0.bias", [1536]), ("linear.1.weight", [1536]),
        ("linear.1.bias", [1536]), ("linear.2.weight", [768, 1536]), ("linear.2.bias", [768]),
        ("linear.3.weight", [768]), ("linear.3.bias", [768])]),
    "121-swish-ln": (([1, 2, 1], "swish", True, False, False, False), [
        ("linear.0.weight", [1536, 768]), ("linear.0.bias", [1536]), ("linear.2.weight", [1536]),
        ("linear.2.bias", [1536]), ("linear.3.weight", [768, 1536]), ("linear.3.bias", [768]),
        ("linear.4.weight", [768]), ("linear.4.bias", [768])]),
    "1221-relu-dropout": (([1, 2, 2, 1], "relu", False, True, False, False), [
        ("linear.0.weight", [1536, 768]), ("linear.0.bias", [1536]),
        ("linear.3.weight", [1536, 1536]), ("linear.3.bias", [1536]),
        ("linear.5.weight", [768, 1536]), ("linear.5.bias", [768])]),
    "1221-relu-dropout-last": (([1, 2, 2, 1], "relu", False, True, True, False), [
        ("linear.0.weight", [1536, 768]), ("linear.0.bias", [1536]),
        ("linear.3.weight", [1536, 1536]), ("linear.3.bias", [1536]),
        ("linear.6.weight", [768, 1536]), ("linear.6.bias", [768])]),
    "1.51-tanh-ln-activate-output": (([1, 1.5, 1], "tanh", True, False, False, True), [
        ("linear.0.weight", [1152, 768]), ("linear.0.bias", [1152]), ("linear.2.weight", [1152]),
        ("linear.2.bias", [1152]), ("linear.3.weight", [768, 1152]), ("linear.3.bias", [768]),
        ("linear.5.weight", [768]), ("linear.5.bias", [768])]),
}
DROPOUT = {"1221-relu-dropout": [0.0, 0.3, 0.0, 0.0], "1221-relu-dropout-last": [0.0, 0.3, 0.3, 0.0]}


@pytest.mark.parametrize("case", LAYOUTS)
def test_pt_layout_is_what_a1111_builds(case, tmp_path):
    (ls, activation, ln, dropout, last, act_out), expected = LAYOUTS[case]
    settings = dict(layer_structure=ls, activation=activation, layer_norm=ln, dropout=dropout,
                    last_layer_dropout=last, activate_output=act_out)
    recipe = resolve_recipe("tiny-hypernetwork", [f"hypernetwork.{k}={json.dumps(v)}" for k, v in settings.items()])
    network = Hypernetwork(HypernetworkMethod(recipe).config, [768])
    path = save_hypernetwork_pt(tmp_path / "h.pt", network, INFO)
    data = torch.load(path, weights_only=True)
    assert layout(data[768][0]) == expected and layout(data[768][1]) == expected
    assert data["layer_structure"] == ls and data["activation_func"] == activation
    assert data["is_layer_norm"] is ln and data["use_dropout"] is dropout and data["activate_output"] is act_out
    assert data["dropout_structure"] == DROPOUT.get(case, [0.0] * len(ls))
    assert data["last_layer_dropout"] is last


@pytest.mark.parametrize("arch, widths, params", [("sd15", [768, 320, 640, 1280], 21_939_840),
                                                  ("sd21", [1024, 320, 640, 1280], 25_611_392)])
def test_full_size_bases_get_one_pair_per_context_width(arch, widths, params):
    base = build_random(ARCHS[arch], meta=True)  # shapes only
    assert context_widths(base.unet) == widths
    method = HypernetworkMethod(resolve_recipe("sd15-hypernetwork"))
    groups = method.prepare(base)
    # A1111's [1, 2, 1] network: 2 * (4w^2 + 3w) per width (SD 1.5: the familiar ~88 MB fp32 file)
    assert sum(p.numel() for g in groups for p in g["params"]) == params
    assert all(isinstance(p, HypernetworkAttnProcessor) for p in base.unet.attn_processors.values())
    assert len(base.unet.attn_processors) == 32


def test_reexport_refuses_to_overwrite_then_matches(hn_run):
    run, _, exports = hn_run
    original = torch.load(exports[0], weights_only=True)
    with pytest.raises(DreamloomError, match="already exists"):
        export_run(run.path)
    again = torch.load(export_run(run.path, overwrite=True)[0], weights_only=True)
    assert again.keys() == original.keys()
    for width in (32, 64):
        for a, b in zip(original[width], again[width]):
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("settings, message", [
    (["hypernetwork.layer_structure=[2, 2, 1]"], "hypernetwork.layer_structure.*start and end with 1"),
    (["hypernetwork.layer_structure=[1, 2]"], "hypernetwork.layer_structure.*start and end with 1"),
    (["hypernetwork.activation='banana'"], "hypernetwork.activation = 'banana' is unknown"),
    (["hypernetwork.activation='gelu'"], "ComfyUI refuses.*allow_unportable = true"),
    (["hypernetwork.dropout_structure=[0, 0.3, 0]"], "dropout = false"),
    (["hypernetwork.dropout_structure=[0, 0.3]", "hypernetwork.dropout=true"], "one probability per"),
])
def test_bad_settings_name_the_key_and_the_fix(settings, message):
    recipe = resolve_recipe("tiny-hypernetwork", settings)
    with pytest.raises(RecipeError, match=message):
        HypernetworkMethod(recipe)


def test_unportable_activation_is_allowed_when_asked():
    recipe = resolve_recipe("tiny-hypernetwork", ["hypernetwork.activation='gelu'",
                                                  "hypernetwork.allow_unportable=true"])
    assert HypernetworkMethod(recipe).config.activation_func == "gelu"


class NotATensor:
    """A pickled object that `torch.load(weights_only=True)` must refuse to build."""


def test_sampler_refuses_files_that_do_not_fit(tmp_path, hn_run):
    base = load_base("tiny")
    recipe = resolve_recipe("tiny-hypernetwork", ["hypernetwork.layer_structure=[1, 0.01, 1]"])
    sd15 = Hypernetwork(HypernetworkMethod(recipe).config, [768, 320, 640, 1280])  # small, SD 1.5 widths
    path = save_hypernetwork_pt(tmp_path / "sd15.pt", sd15, INFO)
    with pytest.raises(AdapterError, match=r"sd15.pt' has context widths \[320, 640, 768, 1280\], but base "
                                           r"'tiny' needs \[32, 64\]"):
        attach_hypernetworks(base.pipeline(), base, [(hn_run[2][0], 1.0), (path, 1.0)])
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in base.unet.attn_processors.values())

    unsafe = tmp_path / "unsafe.pt"
    torch.save({32: ({}, {}), "name": NotATensor()}, unsafe)
    with pytest.raises(AdapterError, match="unsafe.pt' cannot be read as a hypernetwork"):
        attach_hypernetworks(base.pipeline(), base, [(unsafe, 1.0)])
    with pytest.raises(AdapterError, match="does not exist"):
        attach_hypernetworks(base.pipeline(), base, [(tmp_path / "missing.pt", 1.0)])


def test_sample_cli_applies_hypernetworks(tmp_path, hn_run, capsys):
    """`dreamloom sample --hypernetwork FILE:STRENGTH`: strength 0 draws the base image."""
    from PIL import Image

    from dreamloom.cli import main

    _, _, exports = hn_run
    paths = {}
    for name, extra in (("base", []), ("zero", ["--hypernetwork", f"{exports[0]}:0"]),
                        ("hn", ["--hypernetwork", f"{exports[0]}:1.0", "--hypernetwork", f"{exports[1]}:0.5"])):
        paths[name] = tmp_path / f"{name}.png"
        assert main(["sample", "--base", "tiny", "--prompt", "a photo of sks star", "--steps", "3",
                     "--out", str(paths[name]), *extra]) == 0
    pixels = {k: np.asarray(Image.open(p)) for k, p in paths.items()}
    assert np.array_equal(pixels["base"], pixels["zero"])
    assert not np.array_equal(pixels["base"], pixels["hn"])
