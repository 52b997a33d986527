import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

if not torch.cuda.is_available():  # run the Triton kernels in the interpreter (before any @triton.jit import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def engine_root(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def _build(ckpt, out, speculative=None, **kw):
    from maverick.builder.builder import build_engine
    from maverick.config import BuildConfig

    if not (out / "config.json").exists():
        build_engine(ckpt, out, BuildConfig(dtype="float32", max_seq_len=256, max_batch_size=4, max_num_tokens=64,
                                            kv_cache_block_size=8, **kw), progress=False, speculative=speculative)
    return out


def _eagle3(engine_root, k: int = 3):
    """A random EAGLE-3 head for the tiny default, in NVIDIA's format (test_eagle3.write_eagle3)."""
    from test_eagle3 import write_eagle3

    from maverick.config import SpeculativeConfig

    path = engine_root / "eagle3"
    if not (path / "config.json").exists():
        write_eagle3(path)
    return SpeculativeConfig(max_draft_len=k, speculative_model_dir=str(path))


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt, engine_root):
    return _build(tiny_ckpt, engine_root / "tp1")


@pytest.fixture(scope="session")
def tiny_engine_tp2(tiny_ckpt, engine_root):
    return _build(tiny_ckpt, engine_root / "tp2", tp_size=2)


@pytest.fixture(scope="session")
def tiny_engine_spec(tiny_ckpt, engine_root):
    """The tiny default with a random EAGLE-3 head, max_draft_len 3."""
    return _build(tiny_ckpt, engine_root / "spec", speculative=_eagle3(engine_root))


@pytest.fixture(scope="session")
def tiny_engine_spec_tp2(tiny_ckpt, engine_root):
    return _build(tiny_ckpt, engine_root / "spec_tp2", speculative=_eagle3(engine_root), tp_size=2)


@pytest.fixture(scope="session")
def llm(tiny_engine):
    from maverick import LLM

    with LLM(tiny_engine, device="cpu") as m:
        yield m


@pytest.fixture(autouse=True)
def _kv_blocks_all_free(request):
    """After every test that used the shared LLM, every KV block is back in the pool."""
    yield
    if "llm" in request.fixturenames:
        llm = request.getfixturevalue("llm")
        assert llm.kv_cache.all_free, "KV blocks leaked"
