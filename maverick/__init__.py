"""Maverick: a min-latency FP8 inference engine for Llama 4.

    from maverick import LLM, SamplingParams
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _bind_plugins() -> None:
    """Make `maverick_plugins` importable when running from a source tree (PYTHONPATH=.).

    An installed package maps plugins/ to `maverick_plugins`; a bare checkout has only plugins/.
    """
    if "maverick_plugins" in sys.modules or importlib.util.find_spec("maverick_plugins") is not None:
        return
    src = Path(__file__).resolve().parent.parent / "plugins"
    spec = importlib.util.spec_from_file_location("maverick_plugins", src / "__init__.py",
                                                  submodule_search_locations=[str(src)])
    if spec is None:
        raise ImportError(f"maverick_plugins is not installed and {src} does not exist")
    module = importlib.util.module_from_spec(spec)
    sys.modules["maverick_plugins"] = module
    spec.loader.exec_module(module)


_bind_plugins()


def _configure_plugins() -> None:
    """Settings of the kernels that come from the environment (read in maverick.envs only); no GPU touched."""
    import maverick_plugins.dispatch as dispatch

    from maverick import envs

    dispatch.request_pdl(envs.pdl())


_configure_plugins()

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import maverick` stays cheap for the builder and checkpoint tools.
    if name == "LLM":
        from maverick.runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from maverick.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'maverick' has no attribute {name!r}")
