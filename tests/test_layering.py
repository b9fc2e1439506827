"""The package's import graph (docs/architecture.md, "Layers"): no cycle among tdm's modules, and a
library core that imports neither MLflow, Ray nor FastAPI, directly or through another tdm module.

Every import statement counts, including those inside functions: a lazy import is still a dependency,
and a cycle of lazy imports is still a tangle."""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tdm"
#: the library core: what runs and is tested without a cluster, a tracking server or a web framework
CORE = ("tdm.config", "tdm.schedules", "tdm.grids", "tdm.sampler", "tdm.losses", "tdm.distiller", "tdm.spec",
        "tdm.backbones", "tdm.errors", "tdm.paths", "tdm.console")
SERVICE_FRAMEWORKS = ("mlflow", "ray", "fastapi", "starlette", "uvicorn")


def module_files() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """Fully qualified names imported anywhere in the module: tdm modules (a `from pkg import sub`
    that names a submodule counts as that submodule) and external packages (top-level name)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
    return {f for f in found if f in MODULES} | {f.split(".")[0] for f in found if not f.startswith("tdm")}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def internal(name):
    return {d for d in GRAPH[name] if d in MODULES and d != name}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in internal(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def is_core(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CORE)


def path_to_framework(start: str) -> list[str] | None:
    """The chain of imports from `start` to a service framework, or None."""
    seen, todo = {start: [start]}, [start]
    while todo:
        v = todo.pop()
        hit = sorted(set(GRAPH[v]) & set(SERVICE_FRAMEWORKS))
        if hit:
            return seen[v] + [hit[0]]
        for w in sorted(internal(v)):
            if w not in seen:
                seen[w] = seen[v] + [w]
                todo.append(w)
    return None


def test_no_import_cycles_in_tdm():
    assert cycles() == []


@pytest.mark.parametrize("core", [m for m in sorted(MODULES) if is_core(m)])
def test_core_module_imports_no_service_framework(core):
    assert path_to_framework(core) is None, " -> ".join(path_to_framework(core))


def test_the_walker_sees_lazy_imports_and_frameworks():
    """Controls: the glue does import the frameworks (inside functions too), so the checks above can fail."""
    assert "mlflow" in GRAPH["tdm.tracking"] and "ray" in GRAPH["tdm.serve.generator"]
    assert "tdm.tracking" in GRAPH["tdm.teacher"]          # a lazy import inside a function
    assert path_to_framework("tdm.teacher")[-1] == "mlflow"
    assert sum(is_core(m) for m in MODULES) >= 14
    # a cycle is found when there is one
    GRAPH["tdm.errors"].add("tdm.teacher")
    try:
        assert cycles()
    finally:
        GRAPH["tdm.errors"].discard("tdm.teacher")


def test_the_serving_http_tier_loads_no_tensor_library():
    """An ingress replica imports tdm.serve.ingress (Ray Serve unpickles its class by reference), which
    pulls in the package, the generator module and the model spec. None of them may load torch or
    diffusers at import: torch alone costs seconds of a replica's start, during which the proxy holds
    requests routed to it (/healthz included), and hundreds of MB in every HTTP replica."""
    import subprocess
    import sys

    probe = ("import sys, tdm.serve.ingress, tdm.serve.app, tdm.spec; "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    loaded = out.stdout.strip().splitlines()[-1]
    assert "torch" not in loaded and "diffusers" not in loaded and "transformers" not in loaded, loaded


def _sources():
    return {name: path.read_text() for name, path in MODULES.items()}


def test_one_home_for_tdm_home_and_exception_lines():
    """$TDM_HOME is read only by tdm.paths; the first-line-of-an-exception helper lives only in tdm.errors."""
    readers = sorted(n for n, src in _sources().items() if "TDM_HOME\"" in src or "'TDM_HOME'" in src)
    assert readers == ["tdm.paths"]
    splitters = sorted(n for n, src in _sources().items() if re.search(r"splitlines\(\)\[0\]", src))
    assert splitters == []
    loggers = sorted(n for n, src in _sources().items() if re.search(r'(print|write)\(f"\[tdm\]', src))
    assert loggers == ["tdm.console"]
