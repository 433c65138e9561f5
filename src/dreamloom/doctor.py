"""`dreamloom doctor` (and the studio's About page): what this installation runs on, whether its
libraries are the locked set the test suite passed with, and the known bad combinations, each
named with its fix. Imports nothing heavy until it reports on it."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .paths import cache_root, free_bytes, human_bytes, studio_home

# The libraries dreamloom is built on, listed first; the rest of the lock is counted.
KEY_PACKAGES = ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "datasets",
                "streamlit", "pydantic", "lycoris-lora")
LOW_DISK = 5 * 2**30  # below this a cache or home folder cannot hold an SD 1.5 run's checkpoints


@dataclass(frozen=True)
class KnownBreak:
    """`package` at `versions` with `other` at `other_versions` fails; says what fails and the fix."""

    package: str
    versions: str  # a specifier, e.g. ">=5.24"
    other: str
    other_versions: str
    what: str
    fix: str


KNOWN_BREAKS = [
    KnownBreak("transformers", ">=5.24", "peft", "<0.22",
               "transformers >= 5.24 refuses peft < 0.22 whenever an adapter is put on a text encoder (diffusers "
               "loading a LoRA with text-encoder layers: 'The version of PEFT you are using is not compatible')",
               "pip install 'transformers<5.24' (or peft>=0.22 once it is released)"),
]


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    level: str = "ok"  # "ok" | "note" (works, worth knowing) | "problem" (something will fail)
    fix: str = ""


def lock_path() -> Path:
    """The lock this installation is compared with; `make lock` points DREAMLOOM_LOCK at a candidate."""
    override = os.environ.get("DREAMLOOM_LOCK")
    return Path(override) if override else Path(str(resources.files("dreamloom") / "requirements.lock"))


def read_lock(path: Path | None = None) -> dict[str, str]:
    """{canonical package name: exact version} of a lock file (pip constraints, `name==version`)."""
    path = path or lock_path()
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_checks(lock: dict[str, str]) -> list[Check]:
    checks = []
    for name in KEY_PACKAGES:
        have, locked = installed_version(name), lock.get(canonicalize_name(name))
        if have is None:
            checks.append(Check(name, "not installed", "problem", "pip install -e . (or make install)"))
        elif locked and Version(have) != Version(locked):
            checks.append(Check(name, f"{have} (the lock has {locked})", "note",
                                f"make install uses the locked {locked}; tested combinations are in the lock"))
        else:
            checks.append(Check(name, f"{have}{' (locked)' if locked else ''}"))
    others = [n for n in lock if n not in {canonicalize_name(k) for k in KEY_PACKAGES}]
    differ = [f"{n} {installed_version(n) or 'missing'} (lock {lock[n]})" for n in others
              if installed_version(n) is None or Version(installed_version(n)) != Version(lock[n])]
    checks.append(Check("other locked packages", f"{len(others) - len(differ)} of {len(others)} as locked"
                        + (f"; differ: {', '.join(differ[:6])}" + (" ..." if len(differ) > 6 else "") if differ else ""),
                        "note" if differ else "ok", "make clean && make install" if differ else ""))
    return checks


def break_checks() -> list[Check]:
    from packaging.specifiers import SpecifierSet

    found = []
    for rule in KNOWN_BREAKS:
        have, other = installed_version(rule.package), installed_version(rule.other)
        if have and other and Version(have) in SpecifierSet(rule.versions) \
                and Version(other) in SpecifierSet(rule.other_versions):
            found.append(Check(f"{rule.package} {have} with {rule.other} {other}", rule.what, "problem", rule.fix))
    return found


def device_checks() -> list[Check]:
    import torch

    checks = [Check("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            checks.append(Check(f"CUDA device {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute "
                                f"{p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        checks.append(Check("CUDA", "not available: training runs on the CPU (fine for toy and tiny bases)", "note",
                            "install the CUDA build of torch that fits your driver before dreamloom (README)"))
    mps = getattr(torch.backends, "mps", None)
    checks.append(Check("MPS (Apple GPU)", "available" if mps is not None and mps.is_available() else "not available"))
    return checks


def bitsandbytes_check() -> Check:
    try:
        from bitsandbytes import cextension
    except Exception as exc:  # a broken native library raises many types
        return Check("bitsandbytes backend", f"cannot load ({type(exc).__name__}: {exc})", "problem",
                     "train.optimizer = 'adamw' works without it; reinstall bitsandbytes for adamw8bit")
    backend = getattr(cextension, "BNB_BACKEND", "unknown")
    return Check("bitsandbytes backend", f"{backend} (8-bit AdamW: train.optimizer = 'adamw8bit')")


def disk_checks() -> list[Check]:
    checks = []
    for what, folder in (("cache", cache_root()), ("studio home", studio_home())):
        free = free_bytes(folder)
        low = free < LOW_DISK
        checks.append(Check(f"free disk: {what}", f"{human_bytes(free)} at {folder}", "note" if low else "ok",
                            f"free space there, or move it ({'DREAMLOOM_CACHE' if what == 'cache' else 'DREAMLOOM_HOME'})"
                            if low else ""))
    return checks


def report() -> list[Check]:
    from . import __version__

    lock = read_lock()
    return [Check("dreamloom", f"{__version__} (python {platform.python_version()}, {sys.platform} "
                  f"{platform.machine()})"), *package_checks(lock), *break_checks(), *device_checks(),
            bitsandbytes_check(), *disk_checks(), Check("lock", str(lock_path()))]


def format_report(checks: list[Check]) -> str:
    marks = {"ok": "ok  ", "note": "note", "problem": "FAIL"}
    width = max(len(c.name) for c in checks) + 2
    lines = [f"{marks[c.level]}  {c.name:<{width}}{c.value}" + (f"\n      {'':<{width}}fix: {c.fix}" if c.fix else "")
             for c in checks]
    problems = sum(c.level == "problem" for c in checks)
    lines.append(f"\n{problems} problem(s) found." if problems else "\nno problems found.")
    return "\n".join(lines)
