"""The installation: the suite runs on the locked libraries, `dreamloom doctor` reports them and names
a known bad combination with its fix, and training does not depend on transformers' peft glue."""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

from dreamloom import doctor
from dreamloom.cli import main
from helpers import train_tiny


def test_installed_versions_are_the_locked_ones():
    lock = doctor.read_lock()
    assert {"diffusers", "transformers", "peft", "accelerate", "streamlit"} <= lock.keys()
    differ = {name: (metadata.version(name), pinned) for name, pinned in lock.items()
              if Version(metadata.version(name)) != Version(pinned)}
    assert not differ, f"installed versions differ from {doctor.lock_path()}: {differ} (make clean && make test)"


def test_doctor_reports_versions_devices_and_disk(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in ("transformers", "(locked)", "CUDA", "MPS", "bitsandbytes backend", "free disk: cache",
                 "free disk: studio home", "no problems found"):
        assert word in out, out


def test_doctor_names_a_known_break_with_its_fix(capsys, monkeypatch):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version",
                        lambda name: {"transformers": "5.24.0", "peft": "0.21.2"}.get(name) or real(name))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  transformers 5.24.0 with peft 0.21.2" in out and "pip install 'transformers<5.24'" in out
    assert "5.24.0 (the lock has" in out and "1 problem(s) found" in out


def test_text_encoder_lora_trains_without_transformers_peft_integration(tmp_path, subject_dir, monkeypatch):
    """transformers' add_adapter checks peft's version at run time; a release broke training that way.
    With it (and its version check) unusable, a text-encoder LoRA still trains and changes the encoder."""
    import transformers.integrations.peft as integration

    def refuse(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible")
    monkeypatch.setattr(integration.PeftAdapterMixin, "add_adapter", refuse)
    monkeypatch.setattr(integration, "check_peft_version", refuse)
    _, trained, _ = train_tiny(tmp_path, subject_dir, ["train.steps=5", "lora.train_text_encoder=true"])
    te = [p for n, p in trained.text_encoder.named_parameters() if "lora_B" in n]
    assert te and all(p.abs().sum() > 0 for p in te)
