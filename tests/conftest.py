import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import CONFIGS, make_ckpt  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_root):
    """The bundled tiny default (fp32 weights for exact parity tests)."""
    return make_ckpt(ckpt_root, "default")


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def any_ckpt(request, ckpt_root):
    return make_ckpt(ckpt_root, request.param)
