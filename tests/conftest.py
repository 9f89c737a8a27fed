import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub


@pytest.fixture
def root() -> Path:
    return ROOT
