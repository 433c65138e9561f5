"""The Streamlit studio: pages over the core (`app.py`), and the plain-Python helpers they use,
which hold the logic and are tested without Streamlit. It never trains: jobs go to the queue."""

from __future__ import annotations

import re

from ..paths import studio_home

__all__ = ["literal", "studio_home"]


def literal(text: str) -> str:
    """Text shown as written in Streamlit's markdown: file names like my_dog_1.png keep their
    underscores, a $ starts no formula. Line breaks and '- ' list items still render."""
    return re.sub(r"([\\`*_{}\[\]<>#|~$])", r"\\\1", text)
