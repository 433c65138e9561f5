"""Shared fixtures. Everything runs on the CPU with the `tiny` base; nothing is downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: a hub call must fail fast, never wait on a network.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Latent caches of the tests never touch the user's ~/.cache."""
    os.environ["DREAMLOOM_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    from helpers import write_subject_images

    folder = tmp_path_factory.mktemp("subject")
    write_subject_images(folder, count=4)
    return folder


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """Environment for `dreamloom` subprocesses: the venv's script dir first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
