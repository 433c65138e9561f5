"""The CLI as a user runs it: train the tiny recipe in a real process, then sample its export."""

from __future__ import annotations

import subprocess
import tomllib

from PIL import Image

from dreamloom.cli import main
from dreamloom.recipes import builtin_names


def test_train_then_sample_in_subprocesses(tmp_path, subject_dir, cli_env):
    out = tmp_path / "runs"
    train = subprocess.run(
        ["dreamloom", "train", "tiny-lora", "--data", str(subject_dir), "--trigger", "sks",
         "--class-word", "star", "--out", str(out), "--set", "train.steps=12", "--set", "lora.rank=2"],
        env=cli_env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    exports = [line.split(": ", 1)[1] for line in train.stdout.splitlines() if line.startswith("export: ")]
    assert len(exports) == 2 and exports[0].endswith("sks-lora.safetensors")
    run_dir = next(out.iterdir())
    assert tomllib.loads((run_dir / "recipe.toml").read_text())["lora"]["rank"] == 2

    grid = tmp_path / "grid.png"
    sample = subprocess.run(
        ["dreamloom", "sample", "--base", "tiny", "--lora", f"{exports[0]}:0.8", "--prompt", "a photo of sks star",
         "--prompt", "a photo of a star", "--n", "2", "--seed", "7", "--steps", "5", "--out", str(grid)],
        env=cli_env, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert Image.open(grid).size == (128, 128)  # 2 prompts x 2 images of 64 px


def test_recipes_list_and_show(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-lora" in listing and "sd15-lora-12gb" in listing
    for name in builtin_names():
        assert main(["recipes", "show", name]) == 0
        assert tomllib.loads(capsys.readouterr().out)["name"] == name


def test_estimate_command(capsys):
    assert main(["estimate", "sd15-dreambooth-12gb", "--base", "random:sd15", "--resolution", "512", "--vram", "12"]) == 0
    out = capsys.readouterr().out
    assert "859,520,964" in out and "fits a 12 GiB card" in out
    assert main(["estimate", "sd15-dreambooth-12gb", "--base", "random:sd15", "--vram", "6"]) == 0
    assert "WARNING" in capsys.readouterr().out
    assert main(["estimate", "tiny-lora", "--base", "random:sd99"]) == 2
    assert "unknown random architecture 'random:sd99'" in capsys.readouterr().err
