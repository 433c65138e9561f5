"""Tests for dreamloom.datasets: scanning, image decoding and the latent cache."""

import dataclasses
import hashlib
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from dreamloom.datasets import (
    SUPPORTED_SUFFIXES,
    LatentCache,
    load_image,
    load_items,
    sample_latents,
    module_fingerprint,
)
from dreamloom.errors import DatasetError

NAMES = dict(trigger="sks", class_word="dog")


def save(path, size=(80, 80), color="red", mode="RGB"):
    return save_img(Image.new(mode, size, color), path)


def save_img(img, path):
    img.save(path)
    return path


# --- load_items ---------------------------------------------------------------------


def test_sidecar_captions_template_and_placeholders(tmp_path):
    save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  a {trigger} {class_word}\non the beach {style} \n")
    save(tmp_path / "a.jpg", size=(120, 90))
    save(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("   \n")  # blank sidecar: falls back to the template
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "orphan.txt").write_text("caption without an image")

    items = load_items(tmp_path, **NAMES)

    assert [i.path.name for i in items] == ["a.jpg", "b.png", "c.webp"]
    assert all(i.path.is_absolute() for i in items)
    assert [i.caption for i in items] == [
        "a photo of sks dog",
        "a sks dog on the beach {style}",
        "a photo of sks dog",
    ]
    assert (items[0].width, items[0].height) == (120, 90)
    assert items[0].sha256 == hashlib.sha256((tmp_path / "a.jpg").read_bytes()).hexdigest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        items[0].caption = "changed"
    custom = load_items(tmp_path, **NAMES, caption_template="{class_word}, {trigger} style")
    assert custom[0].caption == "dog, sks style"


def test_imagefolder_metadata_jsonl_offline(tmp_path, monkeypatch):
    connects = []

    def no_network(*args, **kwargs):
        connects.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    save(tmp_path / "one.png")
    save(tmp_path / "two.jpg", size=(64, 100))
    (tmp_path / "one.txt").write_text("sidecars are ignored when metadata exists")
    rows = [
        {"file_name": "two.jpg", "text": ""},
        {"file_name": "one.png", "text": " {trigger} at home "},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    items = load_items(tmp_path, **NAMES)

    assert [(i.path.name, i.caption) for i in items] == [
        ("one.png", "sks at home"),
        ("two.jpg", "a photo of sks dog"),
    ]
    assert (items[1].width, items[1].height) == (64, 100)
    assert connects == []


def test_imagefolder_metadata_csv_caption_column_and_missing_file(tmp_path):
    save(tmp_path / "one.png")
    (tmp_path / "metadata.csv").write_text(
        "file_name,caption\none.png,a {class_word}\ngone.png,lost\n"
    )
    with pytest.raises(DatasetError, match=r"gone\.png: listed in metadata\.csv but .* not exist"):
        load_items(tmp_path, **NAMES)
    (tmp_path / "metadata.csv").write_text("file_name,prompt\none.png,a {class_word}\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv: no caption column.*'text' or"):
        load_items(tmp_path, **NAMES)
    (tmp_path / "metadata.csv").write_text("file_name,caption\none.png,a {class_word}\n")
    assert load_items(tmp_path, **NAMES)[0].caption == "a dog"


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_items(tmp_path / "nope", **NAMES)
    with pytest.raises(DatasetError, match="not a folder"):
        load_items(save(tmp_path / "file.png"), **NAMES)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no pictures here")
    with pytest.raises(DatasetError, match="No images") as info:
        load_items(empty, **NAMES)
    assert all(suffix in str(info.value) for suffix in SUPPORTED_SUFFIXES)


def test_all_problems_reported_at_once(tmp_path):
    save(tmp_path / "good.png")
    full = save(tmp_path / "full.jpg", size=(200, 200)).read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "notes.png").write_text("I am not a picture")
    save(tmp_path / "tiny.png", size=(16, 16))

    with pytest.raises(DatasetError) as info:
        load_items(tmp_path, **NAMES)

    lines = str(info.value).splitlines()
    assert "3 problem" in lines[0]
    assert any("truncated.jpg" in ln and "truncated" in ln.split(":", 1)[1] for ln in lines)
    assert any("notes.png" in ln and "not an image" in ln for ln in lines)
    assert any("tiny.png" in ln and "16x16" in ln and "64" in ln for ln in lines)
    assert not any("good.png" in ln for ln in lines)
    assert "run again" in lines[-1]


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (80, 40), "red")
    img.paste((0, 0, 255), (40, 0, 80, 40))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    (item,) = load_items(tmp_path, **NAMES, min_image_size=40)
    assert (item.width, item.height) == (40, 80)

    x = load_image(item.path, 40)  # upright 40x80, center crop keeps rows 20..60
    top, bottom = x[:, 2, 20], x[:, -3, 20]
    assert top[0] > 0.8 and top[2] < -0.8  # red on top
    assert bottom[2] > 0.8 and bottom[0] < -0.8  # blue below


# --- load_image ----------------------------------------------------------------------


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent red
    img.paste((0, 0, 255, 255), (32, 0, 64, 64))  # opaque blue on the right
    x = load_image(save_img(img, tmp_path / "a.png"), 64)
    assert torch.allclose(x[:, :, :30], torch.ones(3, 64, 30))
    assert torch.allclose(x[:, :, 34:].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]))


def test_sixteen_bit_grey_is_mid_grey_not_white(tmp_path):
    grey = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    assert grey.mode == "I;16"
    x = load_image(save_img(grey, tmp_path / "grey16.png"), 32)
    assert x.abs().max() < 0.02  # 32768/65535 -> 128/255 -> ~0.0


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    x = load_image(save(tmp_path / f"img{suffix}", mode=mode, color=0), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_crops_are_reproducible_and_flip_mirrors(tmp_path):
    ramp = np.tile(np.arange(120, dtype=np.uint8)[None, :, None] * 2, (60, 1, 3))
    path = save_img(Image.fromarray(ramp), tmp_path / "ramp.png")

    center = load_image(path, 60)
    expected = torch.from_numpy(ramp[:, 30:90]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(center, expected, atol=1e-6)

    def random_crop(seed):
        return load_image(path, 60, crop="random", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(random_crop(7), random_crop(7))
    assert len({random_crop(seed)[0, 0, 0].item() for seed in range(6)}) > 1
    assert torch.equal(load_image(path, 60, flip=True), center.flip(-1))
    with pytest.raises(ValueError, match="crop"):
        load_image(path, 60, crop="top")


# --- latent cache --------------------------------------------------------------------


@pytest.fixture
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    ).eval()


def test_vae_fingerprint_tracks_weights(vae):
    fp = module_fingerprint(vae)
    assert fp == module_fingerprint(vae) and int(fp, 16) >= 0 and len(fp) <= 32
    with torch.no_grad():
        list(vae.parameters())[-1].add_(0.01)
    assert module_fingerprint(vae) != fp


def test_latent_cache_reads_back_and_reencodes_corrupt_files(tmp_path, vae, monkeypatch):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 32, 3), dtype=np.uint8))
    save_img(img, tmp_path / "img.png")
    (item,) = load_items(tmp_path, **NAMES, min_image_size=32)
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(1) or encode(x))
    cache = LatentCache(tmp_path / "cache" / "nested", module_fingerprint(vae))

    first = cache.moments(item, 32, False, vae)
    files = sorted((tmp_path / "cache" / "nested").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors" and len(calls) == 1
    assert first.shape == (8, 16, 16) and first.dtype == torch.float32
    with torch.no_grad():
        direct = encode(load_image(item.path, 32)[None]).latent_dist.parameters[0]
    assert torch.equal(cache.moments(item, 32, False, vae), direct)
    assert len(calls) == 1  # second call came from disk

    flipped = cache.moments(item, 32, True, vae)
    other = LatentCache(cache.root, "0123abcd").moments(item, 32, False, vae)
    assert len(calls) == 3 and len(list(cache.root.iterdir())) == 3
    assert not torch.equal(flipped, first) and torch.equal(other, first)

    files[0].write_bytes(b"\x10\x00\x00\x00garbage")
    assert torch.equal(cache.moments(item, 32, False, vae), direct)
    assert len(calls) == 4 and len(list(cache.root.iterdir())) == 3  # no temp files left


def test_sample_latents_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 4, 4)
    moments[:, 4:] = moments[:, 4:] * 50  # exercises the logvar clamp
    ours = sample_latents(moments, torch.Generator().manual_seed(3))
    theirs = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(3))
    assert ours.shape == (2, 4, 4, 4) and torch.allclose(ours, theirs)
    assert torch.equal(ours, sample_latents(moments, torch.Generator().manual_seed(3)))
