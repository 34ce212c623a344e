"""The package's shape: no import circles, no reaching into another module's private names, no
function too long to read.

Every import counts, at module level and inside functions alike: an import inside a function still
makes the two modules depend on each other, it only hides the circle from Python until run time.
The modules are read as source (ast), so the check needs no engine and imports nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The designed layout: one import namespace over the top-level folders (pyproject's package-dir).
PACKAGE_DIRS = {"edgecds": ROOT / "toolkit", "edgecds.quant": ROOT / "quant", "edgecds.hwbench": ROOT / "hwbench",
                "edgecds.profiles": ROOT / "profiles"}
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the edgecds module imported (a submodule when the name is one)
    name: str | None  # the name imported from it; None for `import edgecds.x`
    line: int


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _absolute(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(known: dict[str, Path]) -> list[Import]:
    found = []
    for importer, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(importer, path, node)
                if target.split(".")[0] != "edgecds":
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.append(Import(importer, submodule if submodule in known else target, None if submodule in known else alias.name,
                                        node.lineno))
            elif isinstance(node, ast.Import):
                found += [Import(importer, a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "edgecds"]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _edges(found: list[Import], known: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in found:
        if i.module in known and i.module != i.importer:
            edges.setdefault(i.importer, set()).add(i.module)
    return edges


def test_the_walk_sees_every_kind_of_import() -> None:
    """The checker itself: a circle hidden inside functions and a private import are found."""
    known = modules()
    assert {"edgecds.cli", "edgecds.engine", "edgecds.engine.factory", "edgecds.formats.types", "edgecds.hwbench.measure"} <= known.keys()
    found = imports(known)
    # in-function imports are walked: the factory opens the engines only inside open_runtime
    assert any(i.importer == "edgecds.engine.factory" and i.module == "edgecds.engine.gguf_runtime" for i in found)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    known = modules()
    found = cycles(_edges(imports(known), known))
    assert found == [], f"import circles among edgecds modules: {found}"


def test_no_private_name_is_imported_from_another_module() -> None:
    # dunders (`__version__`) are public by convention; `_x` is a module's own
    private = [f"{i.importer}:{i.line} imports {i.name} from {i.module}" for i in imports(modules())
               if i.name and i.name.startswith("_") and not (i.name.startswith("__") and i.name.endswith("__"))]
    assert private == []


def test_no_function_is_longer_than_sixty_lines() -> None:
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


BUILD_SIDE = "edgecds.quant"  # quant/: converters, quantizers, importance matrix, zoo, ONNX export
COMMANDS = ("edgecds.cli", "edgecds.commands")  # the thin CLI layer hands build commands to the build side
BENCHMARKS = "edgecds.hwbench.bench"  # development scripts over both sides, not installed


def is_build_side(module: str) -> bool:
    return module == BUILD_SIDE or module.startswith(BUILD_SIDE + ".")


def test_device_modules_import_nothing_of_the_build_side() -> None:
    """The wall the README promises, held by module path (deferred imports included): a device
    install never needs torch, transformers or the converter for what its own modules do."""
    known = modules()
    device = [m for m in known if not is_build_side(m) and not m.startswith((*COMMANDS, BENCHMARKS))]
    assert "edgecds.engine.onnx_fuse" in device and "edgecds.formats.types" in device and "edgecds.quant.quantize" in known
    crossing = [f"{i.importer}:{i.line} imports {i.module}" for i in imports(known)
                if i.importer in device and is_build_side(i.module)]
    assert crossing == []


def test_the_benchmarks_are_not_in_the_installed_package() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert not [p for p in packages if "bench" in p.split(".")]
    used = [f"{i.importer}:{i.line}" for i in imports(modules()) if i.module.startswith(BENCHMARKS) and not i.importer.startswith(BENCHMARKS)]
    assert used == []
