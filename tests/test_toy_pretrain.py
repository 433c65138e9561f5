"""`dreamloom toy pretrain` end to end, for a few steps (the real pretraining never runs in CI)."""

from __future__ import annotations

import torch

from dreamloom.cli import main
from dreamloom.models import load_base
from dreamloom.models.toy import load_toy_base


def test_a_few_pretraining_steps_write_a_loadable_base(tmp_path, capsys):
    out = tmp_path / "toy-base"
    code = main(["toy", "pretrain", "--out", str(out), "--images", "24", "--vae-steps", "2", "--steps", "2",
                 "--set", "train.batch_size=4", "--set", "train.checkpoint_every=0", "--samples", "4"])
    printed = capsys.readouterr().out
    assert code == 1 and "does NOT meet its bar" in printed  # two steps teach nothing; the bar says so
    assert len(list((out / "data").glob("*.txt"))) == 24
    shipped_like = load_toy_base(out / "toy-base.safetensors")
    folder = load_base(str(out / "base"))
    assert folder.arch.name == shipped_like.arch.name == "toy"
    # The fp16 file holds the trained weights (to fp16 precision), the VAE's measured latent scale included.
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(shipped_like, part).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=2e-3, rtol=2e-3) for k in a)
    assert shipped_like.vae.config.scaling_factor == folder.vae.config.scaling_factor != 0.18215
    assert main(["toy", "pretrain"]) == 2 and "needs --out" in capsys.readouterr().err
