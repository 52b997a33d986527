"""The module boundaries (docs in README.md's Layout), checked by walking every import."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out |= {name} if node.module else {f"{name}.{a.name}" for a in node.names}
            else:
                out.add(node.module)
                if node.module == "maverick":  # `from maverick import distributed`
                    out |= {f"maverick.{a.name}" for a in node.names}
    return out


def _files(sub: str) -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


def _third_party(name: str) -> str:
    return name.split(".")[0]


def _check(files, allowed, rule):
    bad = []
    for f in files:
        for imp in _imports(f):
            top = _third_party(imp)
            if top in STDLIB:
                continue
            if not any(imp == a or imp.startswith(a + ".") for a in allowed):
                bad.append(f"{f.relative_to(ROOT)} imports {imp}")
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_plugins_import_only_torch_triton_and_itself():
    _check(_files("maverick_plugins"), ["torch", "triton", "maverick_plugins"], "rule 1")


def test_layers_imports():
    _check(_files("maverick/layers"), ["torch", "triton", "maverick_plugins", "maverick.layers",
                                        "maverick.distributed", "maverick.config"], "rule 2")


def test_models_import_layers_and_config_only():
    _check(_files("maverick/models"), ["torch", "maverick.layers", "maverick.config", "maverick.models"], "rule 3")


@pytest.mark.parametrize("sub", ["maverick/builder", "maverick/checkpoint"])
def test_build_and_checkpoint_never_import_runtime(sub):
    bad = [f"{f.relative_to(ROOT)} imports {i}" for f in _files(sub) for i in _imports(f)
           if i.startswith("maverick.runtime")]
    assert not bad, "rule 4:\n" + "\n".join(bad)


def test_runtime_plain_python_parts():
    """Rule 5, through every import inside the package too (a plain module importing one that imports torch
    is not plain)."""
    for name in ("request.py", "scheduler.py", "step.py", "kv_cache.py", "sampling_params.py"):
        seen, todo = set(), [ROOT / "maverick/runtime" / name]
        while todo:
            f = todo.pop()
            for i in _imports(f):
                assert _third_party(i) != "torch", f"rule 5: {name} must be plain Python; via {f.name} it imports {i}"
                if i.startswith("maverick.") and i not in seen:
                    seen.add(i)
                    path = ROOT / (i.replace(".", "/") + ".py")
                    todo += [path] if path.exists() else []


def _grep(pattern: str, subs=("maverick", "maverick_plugins")) -> list[str]:
    hits = []
    for sub in subs:
        for f in _files(sub):
            if pattern in f.read_text():
                hits.append(str(f.relative_to(ROOT)))
    return hits


def test_only_cuda_graph_module_touches_cudagraph():
    """Rule 5 is about the runtime (benchmarks outside it capture their own graphs)."""
    assert set(_grep("CUDAGraph", subs=("maverick/runtime", "maverick/layers", "maverick/models"))) <= \
        {"maverick/runtime/cuda_graph.py"}


def test_only_distributed_and_worker_init_process_groups():
    """In the engine; a benchmark of a bare collective (maverick/bench/allreduce.py) forms its own group."""
    hits = set(_grep("init_process_group")) - {"maverick/bench/allreduce.py"}
    assert hits <= {"maverick/distributed.py", "maverick/runtime/worker.py"}, hits


def test_environment_read_in_one_module():
    hits = set(_grep("os.environ")) | set(_grep("getenv"))
    assert hits <= {"maverick/envs.py"}, hits


def test_top_level_clis_are_thin():
    for name in ("build_engine.py", "quantize.py"):
        f = ROOT / name
        assert f.exists(), f"{name} missing"
        assert len(f.read_text().splitlines()) < 40, f"{name} should only parse arguments and call the package"
        assert {_third_party(i) for i in _imports(f)} <= STDLIB | {"maverick"}


def test_import_maverick_registers_no_custom_ops():
    """`import maverick` (and the kernels package) only defines things; the custom ops are registered on request."""
    import subprocess
    import sys

    code = ("import torch, maverick, maverick_plugins; from maverick import LLM; "
            "print(hasattr(torch.ops.maverick, 'fp8_linear'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
    code = "import torch, maverick_plugins.library; print(hasattr(torch.ops.maverick, 'fp8_linear'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "True", r.stderr[-2000:]
