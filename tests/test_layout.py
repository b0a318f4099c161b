"""The layout stays true: the two services share code only through ``common/``, adapters see the
bridge only through its port, and the proxy's image holds no bridge code. Read from the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("common", "bridge", "adapters", "auth_proxy")


def imports_of(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports (top level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def project_imports(package: str) -> dict[str, set[str]]:
    """Like ``imports_of``, only the project's own modules, each reduced to package.module."""
    out = {}
    for file, names in imports_of(package).items():
        own = {".".join(n.split(".")[:2]) for n in names if n.split(".")[0] in PACKAGES}
        out[file] = {n for n in own if n.split(".")[0] != package}
    return out


def test_the_proxy_imports_nothing_of_the_bridge():
    for file, names in project_imports("auth_proxy").items():
        assert names <= {"common.access", "common.errors", "common.logs", "common.openapi", "common.settings",
                         "common.serving"}, \
            (file, names)


def test_the_shared_package_depends_on_neither_service():
    for file, names in project_imports("common").items():
        assert not names, (file, names)


def test_adapters_see_the_bridge_only_through_its_port():
    for file, names in project_imports("adapters").items():
        assert names <= {"bridge.ports"}, (file, names)
    # And the port itself stands alone: it imports no other part of the bridge.
    assert project_imports("bridge")["bridge/ports.py"] == set()


@pytest.mark.parametrize("rule, bad_line", [
    (test_the_proxy_imports_nothing_of_the_bridge, "from bridge.config import load_settings\n"),
    (test_adapters_see_the_bridge_only_through_its_port, "    from bridge.models.catalog import ModelSpec\n"),
])
def test_the_rules_catch_a_wrong_import(rule, bad_line, monkeypatch):
    """Each rule fails on one wrong import (top level or inside a function)."""
    target = "auth_proxy/keys.py" if "proxy" in rule.__name__ else "adapters/websocket.py"
    source = (ROOT / target).read_text()
    if bad_line.startswith(" "):
        bad_line = "def _f():\n" + bad_line
    real = Path.read_text

    def patched(self: Path, *a, **kw) -> str:
        return source + "\n" + bad_line if self == ROOT / target else real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", patched)
    with pytest.raises(AssertionError):
        rule()


def test_the_proxy_image_holds_no_bridge_code():
    text = (ROOT / "Dockerfile.auth").read_text()
    copied = {m.group(1) for m in re.finditer(r"^COPY\s+(\S+)\s", text, re.M)}
    assert copied == {"pyproject.toml", "common", "auth_proxy"}, copied
    bridge_image = (ROOT / "Dockerfile.bridge").read_text()
    copied = {m.group(1) for m in re.finditer(r"^COPY\s+(\S+)\s", bridge_image, re.M)}
    assert "auth_proxy" not in copied and {"common", "bridge", "adapters"} <= copied


def import_circles(package: str) -> list[list[str]]:
    """Circles among the modules of ``package`` (imports inside functions and under TYPE_CHECKING
    included): each as the list of modules around it."""
    graph: dict[str, set[str]] = {}
    for file, names in imports_of(package).items():
        module = file[:-3].replace("/", ".").removesuffix(".__init__")
        graph[module] = {n for n in names if n.split(".")[0] == package}
    modules = set(graph)
    edges = {m: {n if n in modules else ".".join(n.split(".")[:-1]) for n in names} & modules - {m}
             for m, names in graph.items()}
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for nxt in sorted(edges[module]):
            visit(nxt, path + [module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    return circles


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_has_an_import_circle(package):
    assert import_circles(package) == []


def test_the_circle_check_finds_a_deferred_import(monkeypatch):
    """The proxy's live sessions once imported the guessing guard back from the app, inside a function."""
    source = (ROOT / "auth_proxy/realtime.py").read_text()
    real = Path.read_text

    def patched(self: Path, *a, **kw) -> str:
        extra = "\n\ndef _f():\n    from auth_proxy.app import create_app\n"
        return source + extra if self == ROOT / "auth_proxy/realtime.py" else real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", patched)
    assert any("auth_proxy.app" in circle for circle in import_circles("auth_proxy"))


MAX_FUNCTION_LINES = 80
MAX_NESTING = 4
NESTING = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)


def nesting(node: ast.AST, depth: int = 0) -> int:
    """How deep blocks nest inside ``node`` (an ``elif`` is no deeper than its ``if``; functions and
    classes defined inside count on their own)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        elif_ = isinstance(node, ast.If) and node.orelse == [child] and isinstance(child, ast.If)
        deeper = isinstance(child, NESTING) and not elif_
        deepest = max(deepest, nesting(child, depth + deeper))
    return deepest


def oversized_functions(source: str, file: str) -> dict[str, str]:
    """``file:function`` -> what is too much (lines, nesting) for each function of ``source`` over the limits."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines, depth = node.end_lineno - node.lineno + 1, nesting(node)
            if lines > MAX_FUNCTION_LINES or depth > MAX_NESTING:
                found[f"{file}:{node.name}"] = f"{lines} lines, nested {depth} deep"
    return found


def test_functions_stay_short_and_shallow():
    """No function outside the tests is over 80 lines or nests blocks more than 4 deep: a function
    reads as its docstring."""
    found: dict[str, str] = {}
    for package in (*PACKAGES, "bench", "scripts"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found |= oversized_functions(path.read_text(), str(path.relative_to(ROOT)))
    assert found == {}


def test_the_size_check_finds_a_deep_function():
    deep = "def f(x):\n    for a in x:\n        if a:\n            with a:\n                try:\n" \
           "                    while a:\n                        pass\n                except E:\n" \
           "                    pass\n"
    flat = "def g(x):\n    if x:\n        pass\n    elif x:\n        pass\n" \
           "    elif x:\n        if x:\n            pass\n"
    assert oversized_functions(deep, "m.py") == {"m.py:f": "9 lines, nested 5 deep"}
    assert oversized_functions(flat, "m.py") == {}
    assert "m.py:h" in oversized_functions("def h():\n" + "    x = 1\n" * 80, "m.py")


def string_lists(values: set[str], least: int) -> list[str]:
    """Where the project's code writes a list, tuple, set or ``Literal`` of at least ``least`` of ``values``."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                elements = node.elts if isinstance(node, ast.List | ast.Tuple | ast.Set) else None
                if isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "Literal":
                    elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
                strings = {e.value for e in elements or [] if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(strings & values) >= least:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(found))  # a Literal and the tuple inside it: one place


def test_the_response_formats_and_the_adapter_names_are_listed_once():
    """Adding a response format or an engine adapter means changing one line, not finding four files."""
    formats = string_lists({"json", "text", "srt", "verbose_json", "vtt", "diarized_json"}, least=3)
    assert [f.split(":")[0] for f in formats] == ["common/response_formats.py"] * len(formats) and formats, formats
    adapters = string_lists({"managed-websocket", "websocket", "subprocess"}, least=2)
    assert [a.split(":")[0] for a in adapters] == ["bridge/config.py"], adapters


GROUPS = ("bridge.decoding", "bridge.models")
BRIDGE_BASE = {"bridge.ports", "bridge.config", "bridge.metrics"}


def test_the_bridges_groups_import_only_its_base():
    """Decoding and models are groups of their own: they import nothing of the rest of the bridge
    but its base (the port, the settings, the metrics), so the imports between them and the rest
    run one way."""
    crossing = {}
    for file, names in imports_of("bridge").items():
        module = file[:-3].replace("/", ".")
        group = next((g for g in GROUPS if module.startswith(g + ".")), None)
        if group is None:
            continue
        outside = {n for n in names if n.startswith("bridge.") and not n.startswith(group)
                   and ".".join(n.split(".")[:2]) not in BRIDGE_BASE}
        if outside:
            crossing[file] = sorted(outside)
    assert crossing == {}
