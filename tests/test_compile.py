"""train.compile = "blocks": the UNet's repeated blocks, compiled in place, train what the uncompiled blocks train;
the compile's time is reported apart from the steps'; the weights keep their names; no compiler is a clear refusal."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from dreamloom.cli import main
from helpers import largest_difference, train_tiny

SETS = ["train.steps=3", "train.checkpoint_every=0", "train.log_every=1", "sample.images_per_prompt=1",
        "sample.steps=2", "export.formats=['diffusers']", "export.dtype='fp32'"]


def test_compiled_blocks_train_what_eager_blocks_train(tmp_path, subject_dir):
    from torch._dynamo.utils import counters

    eager, _, (eager_export,) = train_tiny(tmp_path / "eager", subject_dir, SETS)
    counters.clear()
    compiled, _, (export,) = train_tiny(tmp_path / "compiled", subject_dir, SETS + ["train.compile='blocks'"])
    assert counters["stats"]["unique_graphs"] > 0  # the blocks did run as compiled graphs
    (event,) = [e for e in compiled.events() if e["event"] == "compile"]
    assert event["blocks"] > 0 and event["seconds"] > 0
    steps = [e for e in compiled.events() if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and steps[-1]["it_s"] > 0
    assert "it_s" not in steps[0]  # its time went to compiling: no speed rather than a speed of 0
    ours, theirs = load_file(export), load_file(eager_export)
    assert ours.keys() == theirs.keys()  # no torch.compile wrapper in the names
    assert largest_difference(ours, theirs) < 1e-4  # fused kernels round differently, nothing more


def test_compiling_without_a_compiler_is_refused_before_the_run(tmp_path, subject_dir, capsys, monkeypatch):
    monkeypatch.setattr("dreamloom.trainers.compiling.shutil.which", lambda name: None)
    code = main(["train", "tiny-lora", "--data", str(subject_dir), "--out", str(tmp_path / "runs"),
                 "--set", "train.compile='blocks'"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.compile = 'blocks' needs a C++ compiler" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.fixture(autouse=True)
def _eager_afterwards():
    yield
    import torch

    torch._dynamo.reset()  # compiled code held by this module's models goes with them
