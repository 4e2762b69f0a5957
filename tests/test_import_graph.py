"""The module import graph of `pipelines`, `volumetric` and `preprocessing`: no cycle, and no
import that runs up the declared layer order (docs/architecture.md, "Layers").

Every module is parsed with `ast` (nothing is imported); every `import` / `from ... import`
statement counts, at the top of a module or inside a function, under `if TYPE_CHECKING:` too
(a type-only import is still a dependency of the module's meaning).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "volumetric", "preprocessing")

# Top to bottom: a module may import modules of its own layer or of a layer below it. A name
# stands for that module and every module below it (`pipelines.commands` = each command); the
# longest name that matches a module places it. Cycles inside a layer are caught by the cycle check.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipelines.cli",),
    ("pipelines.commands",),
    ("pipelines.demo", "pipelines.reproduce", "pipelines.bids_app"),
    ("pipelines.screen", "pipelines.distributed.extract"),
    ("pipelines.reference",),
    ("pipelines.distributed.runners", "pipelines.distributed.reaper"),
    ("pipelines.distributed.per_scan",),
    ("pipelines.stages.scan_maps",),
    ("pipelines.stages.score",),
    ("pipelines.stages.tokens",),
    ("pipelines.stages.preprocess", "pipelines.stages"),
    ("pipelines.distributed.completeness", "pipelines.distributed.error_log", "pipelines.distributed.sharding",
     "pipelines.distributed"),
    # The run's files: metrics, report, figures, viewers, cache accounting.
    ("pipelines.evaluate",),
    ("pipelines.report_build", "pipelines.report_html", "pipelines.report", "pipelines.figures", "pipelines.viewer",
     "pipelines.viewer2d", "pipelines.cache_files", "pipelines.datasets"),
    ("pipelines.plan",),
    ("pipelines.validation",),
    ("pipelines.screen_config", "pipelines.config_schema"),
    ("pipelines.cache_locations",),
    # Building blocks that know nothing of a run's settings.
    ("pipelines.subjects", "pipelines.labels", "pipelines.images2d", "pipelines.maps", "pipelines.hotspots",
     "pipelines.flagging", "pipelines.ids", "pipelines.run_folder", "pipelines.run_layout", "pipelines.safe_text",
     "pipelines.failures", "pipelines.json_ready", "pipelines.choices", "pipelines.phantom", "pipelines"),
    ("preprocessing",),
    ("volumetric",),
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module of `PACKAGES` (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _owner(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that `name` (a module or a name inside one) lies in."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules of `modules` it imports}, from every import statement of its source."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != name:
                    graph[name].add(owner)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int | None:
    """Index (0 = top) of the layer whose longest matching name places `module`; None if none does."""
    best: tuple[int, int] | None = None  # (name length, layer)
    for index, names in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else best[1]


def upward_edges(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """'a -> b' for each import of a module in a higher layer (or of one no layer places)."""
    bad = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            here, there = layer_of(module, layers), layer_of(target, layers)
            if here is None or there is None or there < here:
                bad.append(f"{module} (layer {here}) -> {target} (layer {there})")
    return bad


def test_checker_finds_a_cycle_and_an_upward_edge(tmp_path: Path) -> None:
    """The checks themselves on a tiny fake package: a loop closed by an import inside a
    function, an upward import, a relative import, and a clean graph."""
    pkg = tmp_path / "pipelines"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from pipelines.low import helper\n")
    (pkg / "low.py").write_text("def helper():\n    from pipelines import top\n    return top\n")
    (pkg / "mid.py").write_text("from .low import helper\n")
    graph = import_graph(module_files(tmp_path))
    assert graph["pipelines.top"] == {"pipelines.low"}
    assert graph["pipelines.low"] == {"pipelines.top"}  # the function-level import counts
    assert graph["pipelines.mid"] == {"pipelines.low"}  # the relative import resolves
    assert find_cycle(graph) == ["pipelines.low", "pipelines.top", "pipelines.low"]
    layers = (("pipelines.top",), ("pipelines.mid",), ("pipelines.low", "pipelines"))
    assert upward_edges(graph, layers) == ["pipelines.low (layer 2) -> pipelines.top (layer 0)"]
    (pkg / "low.py").write_text("def helper():\n    return 1\n")
    graph = import_graph(module_files(tmp_path))
    assert find_cycle(graph) is None and upward_edges(graph, layers) == []
    assert upward_edges({"pipelines.new": set(), "x.y": {"pipelines.new"}}, layers) == \
        ["x.y (layer None) -> pipelines.new (layer 2)"]  # a module no layer places is an error


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert len(graph) > 100  # the three packages were found
    assert find_cycle(graph) is None


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    unplaced = [m for m in graph if layer_of(m) is None]
    assert not unplaced, f"add these modules to LAYERS (and docs/architecture.md): {unplaced}"


def test_no_import_runs_up_a_layer(graph: dict[str, set[str]]) -> None:
    assert upward_edges(graph) == []


def test_layers_are_documented() -> None:
    """docs/architecture.md lists the same layers, top to bottom."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("### Layers"):]
    positions = [section.index(f"`{names[0]}`") for names in LAYERS]
    assert positions == sorted(positions)
