"""Single-file (original LDM layout) checkpoints: our writer, our reader, and the real layouts.

The expected SD 1.5 / SD 2.1 key names and shapes below are written out by hand from the real
checkpoints' architecture (CompVis v1-inference.yaml / Stability v2-inference-v.yaml module trees;
key names as in diffusers' single-file reader and kohya's converter), not from our converter.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamloom.errors import BaseModelError, DreamloomError
from dreamloom.export.ldm_checkpoint import open_clip_to_ldm, save_single_file, to_ldm_state_dict
from dreamloom.models import ARCHS, build_random, load_base
from dreamloom.models import single_file

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    return save_single_file(tiny, path, dtype="fp32", metadata={"modelspec.title": "my tiny"})


@pytest.fixture(scope="module")
def loaded(saved):
    return load_base(str(saved))


def assert_same_weights(a, b):
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part}.{key}"


def image(base):
    out = base.pipeline()("a photo of a dog", num_inference_steps=2, height=64, width=64,
                          generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


# --- round trips through our writer and diffusers' single-file reader -----------------


def test_safetensors_round_trip_keeps_every_weight(tiny, loaded):
    assert loaded.arch.name == "tiny"
    assert loaded.prediction_type == "epsilon"
    assert len(loaded.tokenizer) == len(tiny.tokenizer)
    assert_same_weights(tiny, loaded)


def test_round_trip_samples_the_same_image(tiny, loaded):
    np.testing.assert_allclose(image(loaded), image(tiny), atol=1e-6)


def test_metadata_and_no_v_markers(saved):
    with safe_open(str(saved), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "dreamloom-tiny"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.title"] == "my tiny"
    assert meta["dreamloom.arch"] == "tiny" and meta["dreamloom.tokenizer"] == "builtin"
    assert "v_pred" not in keys and not saved.with_suffix(".yaml").exists()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}


def test_ckpt_round_trip(tiny, saved, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(saved), "global_step": 7}, path)
    assert_same_weights(tiny, load_base(str(path)))


def test_fp16_export_is_half_the_size_and_loads_as_fp32(tiny, saved, tmp_path):
    path = save_single_file(tiny, tmp_path / "half.safetensors")  # fp16 is the default
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    base = load_base(str(path))
    weight = base.unet.conv_out.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, tiny.unet.conv_out.weight, atol=1e-3, rtol=1e-3)


def test_never_overwrites_without_asking(tiny, saved):
    with pytest.raises(DreamloomError, match="already exists"):
        save_single_file(tiny, saved, dtype="fp32")


def with_prediction(base, prediction, family=None):
    arch = dataclasses.replace(base.arch, family=family or base.arch.family)
    return dataclasses.replace(base, arch=arch,
                               scheduler_config=dict(base.scheduler_config, prediction_type=prediction))


def test_v_prediction_marker_round_trips(tiny, tmp_path):
    path = save_single_file(with_prediction(tiny, "v_prediction"), tmp_path / "v.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "v_pred" in f.keys()
        assert f.metadata()["modelspec.prediction_type"] == "v"
    assert not path.with_suffix(".yaml").exists()  # the A1111 yaml is only for SD 2-v
    assert load_base(str(path)).prediction_type == "v_prediction"


@pytest.mark.parametrize("parameterization, expected", [("v", "v_prediction"), (None, "epsilon")])
def test_sidecar_yaml_decides_prediction_type(saved, tmp_path, parameterization, expected):
    path = tmp_path / "other.safetensors"
    tensors = load_file(saved)
    save_file(tensors, path)  # no metadata: as another tool would write it
    params = {"linear_start": 0.00085} | ({"parameterization": parameterization} if parameterization else {})
    path.with_suffix(".yaml").write_text(yaml.safe_dump({"model": {"params": params}}))
    assert load_base(str(path)).prediction_type == expected


def test_sd2_v_model_gets_openclip_keys_and_a1111_yaml(tiny, tmp_path):
    # tiny dressed as an SD 2 family model: exercises the writer's SD2-v branch cheaply.
    base = with_prediction(tiny, "v_prediction", family="sd2")
    path = save_single_file(base, tmp_path / "v2.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "v_pred" in keys
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    params = config["model"]["params"]
    assert config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params["parameterization"] == "v"
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
    with pytest.raises(DreamloomError, match="already exists"):  # the yaml is protected too
        path.unlink()
        save_single_file(base, path)


def test_sd21_yaml_matches_stability_v2_inference_v():
    from dreamloom.export.ldm_checkpoint import v2_inference_yaml

    params = v2_inference_yaml(build_random(ARCHS["sd21"], meta=True))["model"]["params"]
    unet = params["unet_config"]["params"]
    assert params["parameterization"] == "v" and params["scale_factor"] == 0.18215
    assert (unet["model_channels"], unet["channel_mult"], unet["attention_resolutions"]) == (
        320, [1, 2, 4, 4], [4, 2, 1])
    assert (unet["num_res_blocks"], unet["num_head_channels"], unet["context_dim"]) == (2, 64, 1024)
    assert unet["use_linear_in_transformer"] is True
    assert params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 4, 4]


def test_openclip_text_encoder_round_trips_through_diffusers_reader(tiny, tmp_path):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    tiny.text_encoder.config.save_pretrained(tmp_path / "text_encoder")
    ldm = open_clip_to_ldm(tiny.text_encoder)
    model = create_diffusers_clip_model_from_ldm(
        type(tiny.text_encoder), ldm, config=str(tmp_path), subfolder="text_encoder",
        local_files_only=True)
    expected = tiny.text_encoder.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


# --- the real checkpoint layouts (meta tensors: names and shapes only) -----------------

# The sections of the real v1-5-pruned(-emaonly) checkpoint. The real file's text encoder also
# holds the `position_ids` buffer (197 keys); loaders rebuild it, so we do not write it.
SD15_COUNTS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
SD15_SHAPES = {
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
    "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.0.in_layers.0.weight": (1280,),
    "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.emb_layers.1.bias": (1280,),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.3.1.norm.weight": (1280,),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm3.weight": (320,),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "first_stage_model.decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.layer_norm2.bias": (768,),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
# Absent from a real SD 1.5 file (the decoder's highest level has no upsampler, etc.).
SD15_ABSENT = ["first_stage_model.decoder.up.0.upsample.conv.weight",
               "first_stage_model.encoder.down.3.downsample.conv.weight",
               "model.diffusion_model.input_blocks.10.1.norm.weight",
               "model.diffusion_model.output_blocks.0.1.norm.weight"]


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_sd15_layout_matches_the_real_checkpoint():
    base = build_random(ARCHS["sd15"], meta=True)
    shapes = shapes_of(to_ldm_state_dict(base))
    for prefix, count in SD15_COUNTS.items():
        assert sum(k.startswith(prefix) for k in shapes) == count, prefix
    assert len(shapes) == sum(SD15_COUNTS.values())
    assert {k: shapes.get(k) for k in SD15_SHAPES} == SD15_SHAPES
    assert not set(SD15_ABSENT) & set(shapes)


SD21_SHAPES = {
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
    "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight": (1024, 1024),
    "cond_stage_model.model.transformer.resblocks.22.ln_1.weight": (1024,),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight": (1024, 4096),
    "cond_stage_model.model.ln_final.weight": (1024,),
    "cond_stage_model.model.text_projection": (1024, 1024),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # linear in SD 2
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
}


def test_sd21_layout_has_the_openclip_text_encoder():
    shapes = shapes_of(to_ldm_state_dict(build_random(ARCHS["sd21"], meta=True)))
    assert {k: shapes.get(k) for k in SD21_SHAPES} == SD21_SHAPES
    # 23 resblocks x 12 tensors + embeddings, ln_final and text_projection
    assert sum(k.startswith("cond_stage_model.model.") for k in shapes) == 23 * 12 + 5
    assert not any(k.startswith("cond_stage_model.transformer.") or "q_proj" in k for k in shapes)
    assert sum(k.startswith("model.diffusion_model.") for k in shapes) == 686


# --- bad input ------------------------------------------------------------------------------


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(BaseModelError, match="not a Stable Diffusion checkpoint") as err:
        load_base(str(path))
    assert str(path) in str(err.value)


def test_sdxl_is_refused_by_name(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, path)
    with pytest.raises(BaseModelError, match="SDXL"):
        load_base(str(path))


def test_truncated_files_are_refused(saved, tmp_path):
    blob = saved.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BaseModelError, match="damaged or incomplete") as err:
        load_base(str(path))
    assert str(path) in str(err.value)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(100)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(BaseModelError, match="damaged"):
        load_base(str(ckpt))


@pytest.mark.parametrize("drop", ["model.diffusion_model.out.2.bias",
                                  "cond_stage_model.transformer.text_model.final_layer_norm.weight"])
def test_missing_weights_are_refused(saved, tmp_path, drop):
    tensors = load_file(saved)
    del tensors[drop]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, path)
    with pytest.raises(BaseModelError, match="lacks") as err:
        load_base(str(path))
    assert str(path) in str(err.value)


class Payload:
    """Unpickling this would call os.makedirs: proof of whether code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_pickled_code_in_ckpt_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Payload(str(marker))}, path)
    with pytest.raises(BaseModelError, match="never runs code") as err:
        load_base(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_foreign_checkpoint_without_cached_clip_tokenizer_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(single_file.FAMILIES["sd1"], "tokenizer_repos", (("dreamloom-test/not-in-any-cache", None),))
    path = tmp_path / "civitai-model.safetensors"
    with pytest.raises(BaseModelError, match="CLIP tokenizer") as err:
        single_file.load_tokenizer(path, ARCHS["sd15"], 49408, {})
    assert "network" in str(err.value) and "diffusers model folder" in str(err.value)
