"""Bad input gets one clear error naming the file or key and the fix, and leaves no run behind."""

from __future__ import annotations

import errno
import shutil
import socket

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreamloom.cli import main
from dreamloom.models import ARCHS, build_random


def run_cli(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "runs"


def train_args(data, out, *extra):
    return ["train", "tiny-lora", "--data", str(data), "--out", str(out), *extra]


def test_empty_folder(tmp_path, out, capsys):
    (tmp_path / "empty").mkdir()
    err = run_cli(train_args(tmp_path / "empty", out), capsys)
    assert "empty" in err and ".png" in err
    assert not out.exists()


def test_every_bad_file_is_reported_at_once(tmp_path, out, subject_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(subject_dir, data)
    good = (data / "subject-0.png").read_bytes()
    Image.new("RGB", (80, 80), "red").save(data / "broken.jpg")
    (data / "broken.jpg").write_bytes((data / "broken.jpg").read_bytes()[:200])
    (data / "notes.png").write_text("these are my notes, not a picture")
    Image.new("RGB", (16, 16), "blue").save(data / "tiny.png")
    err = run_cli(train_args(data, out), capsys)
    for name in ("broken.jpg", "notes.png", "tiny.png"):
        assert name in err, err
    assert "16x16" in err and "subject-0.png" not in err
    assert (data / "subject-0.png").read_bytes() == good  # nothing the user made is touched
    assert not out.exists()


@pytest.mark.parametrize("setting, words", [
    ("train.stepz=10", ["train.stepz", "allowed keys", "steps"]),
    ("train.learning_rate=-0.001", ["train.learning_rate", "greater than 0"]),
    ("train.strategy='full_shard'", ["train.strategy", "small adapter", "'ddp'"]),  # tiny-lora: nothing big to shard
])
def test_bad_recipe_values(setting, words, subject_dir, out, capsys):
    err = run_cli(train_args(subject_dir, out, "--set", setting), capsys)
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_unknown_key_in_a_recipe_file(tmp_path, subject_dir, out, capsys):
    recipe = tmp_path / "my.toml"
    recipe.write_text('method = "lora"\n[lora]\nrank = 4\nranq = 8\n')
    err = run_cli(["train", str(recipe), "--data", str(subject_dir), "--out", str(out)], capsys)
    assert "lora.ranq" in err and "rank" in err and str(recipe) in err
    assert not out.exists()


def test_base_path_that_does_not_exist(tmp_path, subject_dir, out, capsys):
    missing = tmp_path / "models" / "my-model.safetensors"
    err = run_cli(train_args(subject_dir, out, "--base", str(missing)), capsys)
    assert str(missing) in err and "not found" in err
    assert not out.exists()


def test_hub_id_without_network_says_to_pass_a_local_model(subject_dir, out, capsys):
    err = run_cli(train_args(subject_dir, out, "--base", "someone/some-model"), capsys)
    assert "someone/some-model" in err and "local" in err
    assert not out.exists()


def test_sampler_refuses_a_lora_for_another_architecture(tmp_path, capsys):
    """A kohya LoRA with SD 1.5's layer widths, given to the tiny base."""
    sd15 = build_random(ARCHS["sd15"], meta=True)
    tensors = {}
    for name, module in sd15.unet.named_modules():
        if name.endswith("attn2.to_k"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.zeros(4, module.in_features)
            tensors[f"{key}.lora_up.weight"] = torch.zeros(module.out_features, 4)
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "sd15-style.safetensors"
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1"})
    err = run_cli(["sample", "--base", "tiny", "--lora", f"{path}:0.8", "--prompt", "x",
                   "--out", str(tmp_path / "g.png")], capsys)
    assert str(path) in err and "does not fit" in err and "sd_v1" in err and "768" in err
    assert not (tmp_path / "g.png").exists()


def test_sampler_refuses_a_file_that_is_not_a_lora(tmp_path, capsys):
    path = tmp_path / "weird.safetensors"
    save_file({"foo": torch.zeros(2)}, path)
    err = run_cli(["sample", "--lora", str(path), "--prompt", "x", "--out", str(tmp_path / "g.png")], capsys)
    assert "not a LoRA" in err


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert "not a dreamloom run directory" in err


def test_target_module_no_layer_has(subject_dir, out, capsys):
    err = run_cli(train_args(subject_dir, out, "--set", "lora.target_modules=['nope', 'to_q']"), capsys)
    assert "lora.target_modules" in err and "'nope'" in err and "to_k" in err, err  # names that exist
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_out_folder_that_cannot_take_a_run(where, tmp_path, subject_dir, capsys, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    target = {"a file": blocker, "under a file": blocker / "runs", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # a read-only mount, as the OS reports it on the first write
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr("dreamloom.paths.tempfile.TemporaryFile", refuse)
    err = run_cli(train_args(subject_dir, target), capsys)
    assert str(target) in err and "--out" in err, err
    assert {"a file": "is a file", "under a file": "a part of the path is a file",
            "read-only": "read-only"}[where] in err
    assert blocker.read_text() == "mine" and not (tmp_path / "ro").exists()


def test_full_disk_before_the_run_names_the_folder_and_what_is_free(subject_dir, out, capsys, monkeypatch):
    monkeypatch.setattr("dreamloom.paths.free_bytes", lambda folder: 5 * 2**20)
    err = run_cli(train_args(subject_dir, out), capsys)
    assert str(out) in err and "5.0 MB free" in err
    assert not out.exists()


def test_fp16_on_a_cpu_leaves_no_run_behind(subject_dir, out, capsys):
    err = run_cli(train_args(subject_dir, out, "--set", "train.mixed_precision='fp16'"), capsys)
    assert "train.mixed_precision" in err and "CUDA" in err
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--out", "grid.xyz"], ["grid.xyz", "not an image type", ".png"]),
    (["--out", "{tmp}"], ["is a folder"]),  # an existing folder, even with --overwrite
    (["--out", "{tmp}/notes.txt/grid.png"], ["notes.txt' is a file, not a folder"]),
    (["--lora", "x.safetensors:nan"], ["strength 'nan'", "finite"]),
    (["--lora", "x.safetensors:inf"], ["strength 'inf'"]),
    (["--hypernetwork", "x.pt:100"], ["strength '100'", "-10 to 10"]),
])
def test_sample_checks_its_arguments_before_any_work(args, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    # --base names nothing: each of these must be refused before the base is even looked for
    err = run_cli(["sample", "--base", "missing-base", "--prompt", "x", "--overwrite", *args], capsys)
    for word in words:
        assert word in err, err
    assert "missing-base" not in err


@pytest.mark.parametrize("flag, value, words", [("--n", "0", ["at least 1"]), ("--steps", "0", ["at least 1"]),
                                                ("--width", "1001", ["multiple of 8", "try 1000"]),
                                                ("--height", "1020", ["multiple of 8", "try 1016"])])
def test_sample_counts_and_sizes_out_of_range_are_usage_errors(flag, value, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--prompt", "x", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and all(w in err for w in words) and "Traceback" not in err, err


def test_export_of_a_damaged_checkpoint_offers_the_previous_one(tmp_path, subject_dir, capsys):
    from helpers import train_tiny

    run, _, _ = train_tiny(tmp_path / "runs", subject_dir, ["train.steps=20", "train.checkpoint_every=10"])
    latest = run.latest_checkpoint() / "trainable.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # a disk error, a copy cut short
    err = run_cli(["export", str(run.path), "--overwrite"], capsys)
    assert str(latest.parent) in err and "damaged" in err and "--step 10" in err
    assert main(["export", str(run.path), "--step", "10", "--overwrite"]) == 0
    assert "export:" in capsys.readouterr().out


@pytest.mark.parametrize("recipe, sets, words", [
    ("tiny-hypernetwork", ["hypernetwork.dropout=true", "hypernetwork.dropout_structure=[0, 0.1, 0]",
                           "hypernetwork.last_layer_dropout=true"], ["hypernetwork.last_layer_dropout", "ignored"]),
    ("tiny-ti", ["train.text_encoder_lr=1e-4"], ["train.text_encoder_lr", "textual_inversion.learning_rate"]),
])
def test_settings_that_would_do_nothing_are_refused(recipe, sets, words, subject_dir, out, capsys):
    args = ["train", recipe, "--data", str(subject_dir), "--out", str(out), "--trigger", "mystyle"]
    err = run_cli(args + [a for s in sets for a in ("--set", s)], capsys)
    for word in words:
        assert word in err, err
    assert not out.exists()


@pytest.mark.parametrize("setting, said", [("data.crop='random'", "data.crop = 'random'"),
                                           ("data.hue_jitter=0.5", "data.hue_jitter > 0")])
def test_latent_caching_with_random_crops_or_hues_is_said_to_do_nothing(tmp_path, subject_dir, setting, said):
    from dreamloom.rundir import RunDir

    with pytest.warns(UserWarning, match=f"data.cache_latents = true does nothing with {said}"):
        assert main(train_args(subject_dir, tmp_path / "runs", "--steps", "2", "--set", setting)) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert any(e["event"] == "warning" and "data.cache_latents" in e["message"] for e in RunDir(run).events())


def test_a_studio_beyond_this_machine_needs_a_password(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DREAMLOOM_PASSWORD", raising=False)
    err = run_cli(["studio", "--host", "0.0.0.0", "--home", str(tmp_path / "home")], capsys)
    assert "--host 0.0.0.0" in err and "--password-file" in err
    (tmp_path / "short").write_text("abc\n")
    err = run_cli(["studio", "--password-file", str(tmp_path / "short"), "--home", str(tmp_path / "home")], capsys)
    assert "shorter than 8" in err and str(tmp_path / "short") in err
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_a_ray_worker_needs_a_cluster_that_answers(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    err = run_cli(["jobs", "worker", "--home", str(tmp_path / "home"), "--ray", address, "--once"], capsys)
    assert f"--ray {address}: no Ray cluster answers there" in err and "ray start --head" in err
    err = run_cli(["jobs", "worker", "--home", str(tmp_path / "home"), "--ray", "head-node", "--once"], capsys)
    assert "HOST:PORT" in err
    err = run_cli(["jobs", "worker", "--home", str(tmp_path / "home"), "--ray", address, "--devices", "0"], capsys)
    assert "--ray and --devices" in err
