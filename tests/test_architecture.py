"""The package's shape (DESIGN §2): no import circles, data flowing one way, no oversized module.

Every import counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dlm"

# Rank in the data flow of DESIGN §2: a module may import modules of its own rank or below, never above.
# source -> data -> training (diffusion) -> checkpoint -> sampling (+ cache) -> front ends.
LAYERS = {
    "dlm.errors": 0,
    "dlm.tokenization": 1,
    "dlm.data": 2,  # every dlm.data.* module
    "dlm.synthetic": 3,
    "dlm.modeling": 3,
    "dlm.isolation": 3,
    "dlm.diffusion": 4,
    "dlm.distributed": 5,
    "dlm.training_args": 5,
    "dlm.training": 5,
    "dlm.checkpoints": 5,
    "dlm.prompts": 3,
    "dlm.policies": 3,
    "dlm.sampler_config": 3,
    "dlm.sampling": 5,
    "dlm.cache": 5,
    "dlm.denoiser": 5,
    "dlm.evaluation": 6,
    "dlm.cli": 7,
    "dlm.display": 7,
    "dlm.serving": 7,
    "dlm.harness": 7,
    "dlm.harness_tasks": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    while name not in LAYERS:
        assert "." in name, f"{name} has no layer in LAYERS: add it where it belongs in the data flow"
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def package_imports() -> dict[str, set[str]]:
    """For each module of dlm, the dlm modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_detects_a_circle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_in_dlm():
    graph = package_imports()
    assert "dlm.errors" in graph and "dlm.data.packing" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_follow_the_data_flow():
    graph = package_imports()
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_ground_module_imports_nothing_from_dlm():
    assert package_imports()["dlm.errors"] == set()


def test_no_module_over_500_lines():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {m: n for m, n in sizes.items() if n > 500}, sizes
