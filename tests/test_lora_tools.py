"""`dreamloom lora merge|resize|extract|info` on the tiny bases, through the real CLI: a merged
checkpoint draws what sampling with the LoRA draws, resizing to full rank is exact and its error falls
as the rank grows, a LoRA extracted from a fine-tune reproduces its image, info describes files without
a base; bad input is one line on stderr, exit 2, and no file written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamloom.cli import main
from dreamloom.export.ldm_checkpoint import save_single_file
from dreamloom.models import load_base
from dreamloom.sampling import attach_loras
from dreamloom.sampling.kohya_patch import adapter_modules
from helpers import image, train_tiny

MERGE_TOLERANCE = 1e-4   # max pixel difference (0-1 floats) vs patched sampling; measured 0 (checkpoint), 2e-6 (one LoRA)
DREAMBOOTH_TOLERANCE = 0.06  # max pixel difference, full-rank --conv LoRA of a real DreamBooth run; measured 0.033
# (what a LoRA cannot carry: the run's changed biases and norms; the run itself moves pixels by up to 0.6)
EXTRACT_TOLERANCE = 1e-3  # max pixel difference, extracted LoRA on the base vs the fine-tune; measured 3e-6


def written_names(base, linear_only=True):
    """Our kohya name of every adapted layer: {name: layer}."""
    seen, out = set(), {}
    for name, (part, module) in base.family.kohya_modules(base).items():
        if (part, module) in seen:
            continue
        seen.add((part, module))
        layer = getattr(base, part).get_submodule(module)
        if not linear_only or layer.weight.dim() == 2:
            out[name] = layer
    return out


def random_lora(path, spec="tiny", rank=4, alpha=2.0, seed=0, scale=0.3):
    """A plain kohya LoRA over every linear layer of the base, with random factors of a visible size."""
    base = load_base(spec)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in written_names(base).items():
        out_f, in_f = layer.weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata={"dreamloom.arch": spec, "ss_network_dim": str(rank),
                                       "ss_network_alpha": str(alpha), "modelspec.trigger_phrase": "sks"})
    return path


def run_ok(args, capsys) -> tuple[str, str]:
    assert main(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def run_bad(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") <= 6, err
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-tools")
    return {"a": random_lora(root / "a.safetensors", seed=1), "b": random_lora(root / "b.safetensors", seed=2, rank=2),
            "xl": random_lora(root / "xl.safetensors", spec="tiny-xl", seed=3), "root": root}


def sampled(loras):
    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, loras)
    return image(pipe)


def test_merge_into_a_checkpoint_draws_what_sampling_with_the_loras_draws(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    run_ok(["lora", "merge", f"{files['a']}:0.7", f"{files['b']}:-0.4", "--base", "tiny", "--dtype", "fp32",
            "--out", str(out)], capsys)
    expected = sampled([(files["a"], 0.7), (files["b"], -0.4)])
    got = image(load_base(str(out)).pipeline())
    assert np.abs(got - expected).max() < MERGE_TOLERANCE
    assert np.abs(expected - image(load_base("tiny").pipeline())).max() > 0.05  # the LoRAs do change the image
    with safe_open(out, "pt") as f:
        merged_from = json.loads(f.metadata()["dreamloom.merged_from"])
    assert [(m["file"], m["strength"]) for m in merged_from] == [("a.safetensors", 0.7), ("b.safetensors", -0.4)]


@pytest.mark.parametrize("how", [[], ["--rank", "6"]])
def test_merge_into_one_lora_by_concatenation_or_svd_is_the_sum(how, files, tmp_path, capsys):
    out = tmp_path / "one.safetensors"
    run_ok(["lora", "merge", f"{files['a']}:0.7", f"{files['b']}:-0.4", "--to-lora", "--base", "tiny",
            "--dtype", "fp32", "--out", str(out), *how], capsys)
    tensors = load_file(out)
    rank = tensors[next(k for k in tensors if k.endswith("lora_down.weight"))].shape[0]
    assert rank == 6  # 4 + 2 side by side, or SVD to 6: the sum's rank is at most 6, so both are exact
    expected = sampled([(files["a"], 0.7), (files["b"], -0.4)])
    assert np.abs(sampled([(out, 1.0)]) - expected).max() < MERGE_TOLERANCE
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "tiny"  # tiny's own version
    assert meta["modelspec.architecture"].endswith("/lora") and meta["ss_network_dim"] == "6"
    assert "dreamloom.merged_from" in meta and meta["sshs_model_hash"]


def test_resize_to_full_rank_is_exact_and_error_falls_with_rank(files, tmp_path, capsys):
    original = load_file(files["a"])
    errors = {}
    for rank in (1, 2, 3, 4):
        out = tmp_path / f"r{rank}.safetensors"
        _, err = run_ok(["lora", "resize", str(files["a"]), "--rank", str(rank), "--dtype", "fp32",
                         "--out", str(out)], capsys)
        assert "relative error" in err
        resized = load_file(out)
        total = sum(((original[f"{n}.lora_up.weight"] @ original[f"{n}.lora_down.weight"]) * 0.5
                     - (resized[f"{n}.lora_up.weight"] @ resized[f"{n}.lora_down.weight"])
                     * resized[f"{n}.alpha"] / rank).norm() ** 2 for n in adapter_modules(original))
        norm = sum(((original[f"{n}.lora_up.weight"] @ original[f"{n}.lora_down.weight"]) * 0.5).norm() ** 2
                   for n in adapter_modules(original))
        errors[rank] = float((total / norm).sqrt())
        assert float(resized[f"{next(iter(adapter_modules(resized)))}.alpha"]) == pytest.approx(2.0 * rank / 4)
    assert errors[4] < 1e-5, errors
    assert errors[1] > errors[2] > errors[3] > errors[4], errors
    print("resize errors by rank:", errors)


def test_resize_by_energy_writes_dynamic_ranks_with_consistent_alpha(files, tmp_path, capsys):
    out = tmp_path / "energy.safetensors"
    run_ok(["lora", "resize", str(files["a"]), "--energy", "0.6", "--dtype", "fp32", "--out", str(out)], capsys)
    tensors = load_file(out)
    ranks = {tensors[f"{n}.lora_down.weight"].shape[0] for n in adapter_modules(tensors)}
    assert max(ranks) <= 4 and min(ranks) >= 1
    for n in adapter_modules(tensors):  # alpha / rank stays the original 2 / 4
        assert float(tensors[f"{n}.alpha"]) / tensors[f"{n}.lora_down.weight"].shape[0] == pytest.approx(0.5)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks" and "dreamloom.resized_from" in meta
    if len(ranks) > 1:
        assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    """A stand-in for a DreamBooth model: the tiny base with rank-3 changes to every linear layer,
    saved as a single-file checkpoint."""
    base = load_base("tiny")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in written_names(base).values():
            out_f, in_f = layer.weight.shape
            layer.weight += 0.2 * torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g) / in_f ** 0.5
    path = tmp_path_factory.mktemp("dreambooth") / "db.safetensors"
    save_single_file(base, path, dtype="fp32")
    return path


def test_extract_reproduces_the_fine_tune(fine_tune, tmp_path, capsys):
    out = tmp_path / "extracted.safetensors"
    _, err = run_ok(["lora", "extract", str(fine_tune), "--base", "tiny", "--rank", "8", "--dtype", "fp32",
                     "--out", str(out)], capsys)
    assert "relative error" in err
    tuned = image(load_base(str(fine_tune)).pipeline())
    got = sampled([(out, 1.0)])
    assert np.abs(got - tuned).max() < EXTRACT_TOLERANCE
    assert np.abs(tuned - image(load_base("tiny").pipeline())).max() > 0.05
    low = tmp_path / "low.safetensors"
    run_ok(["lora", "extract", str(fine_tune), "--base", "tiny", "--rank", "1", "--dtype", "fp32",
            "--out", str(low)], capsys)
    assert np.abs(sampled([(low, 1.0)]) - tuned).max() > np.abs(got - tuned).max()
    with safe_open(out, "pt") as f:
        assert "dreamloom.extracted_from" in f.metadata()


def test_info_describes_without_a_base(files, capsys):
    out, _ = run_ok(["lora", "info", str(files["xl"]), "--json"], capsys)
    info = json.loads(out)
    assert info["kind"] == "lora" and "SDXL" in info["made_for"] and info["ranks"] == {"4": info["layers"]}
    assert info["types"] == {"LoRA": info["layers"]} and info["metadata"]["ss_network_alpha"] == "2.0"
    assert info["trigger"] == "sks" and "ComfyUI" in info["loads_in"]
    text, _ = run_ok(["lora", "info", str(files["a"])], capsys)
    assert "kohya layout" in text and "SD 1.x" in text


def test_merging_two_families_is_refused(files, tmp_path, capsys):
    out = tmp_path / "mixed.safetensors"
    err = run_bad(["lora", "merge", str(files["a"]), str(files["xl"]), "--base", "tiny", "--out", str(out)], capsys)
    assert "different model families" in err and "xl.safetensors" in err and "SDXL" in err
    assert not out.exists()


def test_resize_above_the_files_rank_is_refused(files, tmp_path, capsys):
    out = tmp_path / "big.safetensors"
    err = run_bad(["lora", "resize", str(files["a"]), "--rank", "8", "--out", str(out)], capsys)
    assert "--rank 8" in err and "Choose --rank 4" in err
    assert not out.exists()


def test_an_existing_output_is_never_overwritten_unasked(files, tmp_path, capsys):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"mine")
    err = run_bad(["lora", "resize", str(files["a"]), "--rank", "2", "--out", str(out)], capsys)
    assert "--overwrite" in err and out.read_bytes() == b"mine"
    run_ok(["lora", "resize", str(files["a"]), "--rank", "2", "--out", str(out), "--overwrite"], capsys)
    assert out.read_bytes() != b"mine"


def test_extract_by_energy_finds_the_fine_tunes_rank(fine_tune, tmp_path, capsys):
    out = tmp_path / "energy.safetensors"
    run_ok(["lora", "extract", str(fine_tune), "--base", "tiny", "--energy", "0.9999", "--dtype", "fp32",
            "--out", str(out)], capsys)
    tensors = load_file(out)
    assert {tensors[f"{n}.lora_down.weight"].shape[0] for n in adapter_modules(tensors)} == {3}  # changed at rank 3
    assert len(adapter_modules(tensors)) == len(written_names(load_base("tiny")))  # every changed layer, no other


@pytest.mark.parametrize("tool", ["resize", "merge"])
def test_outputs_load_in_diffusers_own_loader(tool, files, tmp_path, capsys):
    out = tmp_path / f"{tool}.safetensors"
    args = (["resize", str(files["a"]), "--rank", "3"] if tool == "resize"
            else ["merge", f"{files['a']}:0.5", str(files["b"]), "--to-lora", "--base", "tiny"])
    run_ok(["lora", *args, "--dtype", "fp32", "--out", str(out)], capsys)
    pipe = load_base("tiny").pipeline()
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert np.abs(image(pipe) - sampled([(out, 1.0)])).max() < 1e-4


def test_info_tells_embeddings_and_lycoris_types(tmp_path, capsys):
    emb = tmp_path / "sksword.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, emb)
    info = json.loads(run_ok(["lora", "info", str(emb), "--json"], capsys)[0])
    assert (info["kind"], info["vectors"], info["trigger"], info["made_for"]) == ("embedding", 2, "sksword", "SD 1.x")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = tmp_path / "loha.safetensors"
    save_file({f"{name}.{k}": torch.zeros(4, 4) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}, loha,
              metadata={"ss_base_model_version": "sd_v1"})
    info = json.loads(run_ok(["lora", "info", str(loha), "--json"], capsys)[0])
    assert info["types"] == {"LoHa": 1} and "SD 1.x" in info["made_for"]


def test_a_missing_input_is_one_line_naming_it(tmp_path, capsys):
    err = run_bad(["lora", "info", str(tmp_path / "nope.safetensors")], capsys)
    assert "nope.safetensors" in err and "does not exist" in err


def test_extract_of_a_dreambooth_run_reproduces_its_image_at_high_rank(subject_dir, tmp_path, capsys):
    _, _, exports = train_tiny(tmp_path / "run", subject_dir, ["prior.enabled=false", "train.steps=20",
                               "train.checkpoint_every=0", "sample.steps=2", "sample.images_per_prompt=1"],
                               recipe="tiny-dreambooth")
    checkpoint = next(p for p in exports if p.suffix == ".safetensors")
    tuned = image(load_base(str(checkpoint)).pipeline())
    differences = {}
    for rank in (2, 8, 64):  # 64: the full rank of tiny's widest adapted layers
        out = tmp_path / f"r{rank}.safetensors"
        run_ok(["lora", "extract", str(checkpoint), "--base", "tiny", "--rank", str(rank), "--conv",
                "--dtype", "fp32", "--out", str(out)], capsys)
        differences[rank] = float(np.abs(sampled([(out, 1.0)]) - tuned).max())
    assert differences[64] < DREAMBOOTH_TOLERANCE, differences
    assert differences[2] > differences[8] > differences[64], differences  # measured 0.60, 0.25, 0.033


def test_resize_of_another_tools_file_keeps_what_it_says_about_its_base(tmp_path, capsys):
    tensors = load_file(random_lora(tmp_path / "in.safetensors", rank=2))
    other = tmp_path / "other.safetensors"
    save_file(tensors, other, metadata={"ss_base_model_version": "sd_v2", "ss_v2": "True",
                                        "modelspec.prediction_type": "epsilon"})
    out = tmp_path / "small.safetensors"
    run_ok(["lora", "resize", str(other), "--rank", "1", "--out", str(out)], capsys)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.prediction_type"]) == ("sd_v2", "True",
                                                                                               "epsilon")
    assert meta["ss_network_dim"] == "1" and meta["ss_network_alpha"] == "1"


def test_extract_on_sdxl_writes_the_names_kohyas_sdxl_trainer_writes(tmp_path, capsys):
    base = load_base("tiny-xl")
    layer = base.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    with torch.no_grad():
        layer.weight += 0.1
    tuned = tmp_path / "xl-db.safetensors"
    save_single_file(base, tuned, dtype="fp32")
    out = tmp_path / "xl.safetensors"
    run_ok(["lora", "extract", str(tuned), "--base", "tiny-xl", "--rank", "2", "--out", str(out)], capsys)
    (name,) = adapter_modules(load_file(out))
    assert name == base.family.kohya_name(base, "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    info = json.loads(run_ok(["lora", "info", str(out), "--json"], capsys)[0])
    assert "SDXL" in info["made_for"] and info["ranks"] == {"2": 1}
