"""Where things are, and free ports for real servers."""
from __future__ import annotations

import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
