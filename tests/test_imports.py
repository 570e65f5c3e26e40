"""The package's imports run one way: no module imports another that (directly or through others)
imports it back, lazy imports inside functions included; no module re-exports names for old homes;
the package never imports streamlit (pages do)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retino"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    p = PACKAGE.parent / dotted.replace(".", "/")
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the retino modules it imports anywhere in its body (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "retino")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "retino":
                    continue
                for a in node.names:  # `from . import x` imports the module x
                    sub = f"{target}.{a.name}"
                    deps.add(sub if _is_module(sub) else target)
        deps.discard(mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package's __init__ importing its own modules is
    not a cycle through the package (Python imports the package first)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == m.rpartition(".")[0] or m.startswith(d + ".") and d in graph and _module_is_package(d):
                continue  # a submodule importing its own package's __init__
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if state.get(d) is None and d in graph:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None:
            found = visit(m)
            if found:
                return found
    return None


def _module_is_package(dotted: str) -> bool:
    return (PACKAGE.parent / dotted.replace(".", "/") / "__init__.py").is_file()


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20  # the scan saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_compatibility_re_exports():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "import" in line and "noqa: F401" in line]
    assert not offenders, f"names re-exported from an old home (import them from theirs): {offenders}"


def test_the_package_never_imports_streamlit():
    users = [m for m, deps in _all_imports().items() if any(d.split(".")[0] == "streamlit" for d in deps)]
    assert not users, f"retino modules importing streamlit: {users}"


def _all_imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        deps = out.setdefault(_module(path), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                deps.add(node.module)
    return out
