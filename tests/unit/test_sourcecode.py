"""The shape of the source, held by tests (asyncpg's ``tests/test__sourcecode.py`` runs its
linters the same way): the layer order of DESIGN "Architecture", pure layers without I/O
libraries, pglast in one module, no import cycle, SQLSTATEs by name, ruff, and mypy --strict on
the pure layers.

Every proxy module is read with ``ast``, never imported, so a module that fails to import
still gets its imports checked, and the whole file stays fast (mypy aside). Each failure names
the file, the line and the import (or literal) at fault.
"""

from __future__ import annotations

import ast
import functools
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "proxy"

# DESIGN "Architecture": imports point one way, left to right; a module may import from its
# own layer or a layer to its left. A module's place is its first name under ``proxy``
# (``proxy.router.parse`` -> ``router``); directory/ does not exist yet.
LAYERS: tuple[frozenset[str], ...] = (
    # "" is proxy/__init__.py: the version string, importing nothing; anything may read it.
    frozenset({"", "config", "errors"}),
    frozenset({"wire", "auth", "router", "merge"}),
    frozenset({"backend", "fleet"}),
    frozenset({"frontend", "admin", "api", "replication", "directory"}),
    frozenset({"server", "supervisor"}),
    # The commands, at the top. __main__ is ``python -m proxy``, the same entry as the
    # ``pgfleet`` script (cli). demo is the ``pgfleet demo`` command: it starts clusters and a
    # pgfleet process and only reads the router's shard function to show where rows went.
    # embedded starts PostgreSQL clusters for the demo and the tests; it imports no proxy
    # module, and sitting here keeps the serving path (server and everything it imports) from
    # ever depending on it.
    frozenset({"cli", "__main__", "demo", "embedded"}),
)
LAYER_OF = {place: index for index, layer in enumerate(LAYERS) for place in layer}

# DESIGN: "The pure layers never import asyncio" (STYLE: "pure: no asyncio, no sockets").
# config and errors are held too: whatever they import, every pure module imports with them.
PURE = frozenset({"wire", "auth", "router", "merge", "config", "errors"})
IO_LIBRARIES = frozenset({"asyncio", "uvloop", "socket", "asyncpg", "aiohttp"})

# DESIGN "Architecture": the router is "the only pglast user", and within it router/parse.py
# (STYLE practice 4) so that the parser's API and its cost are in one file.
PGLAST_MODULES = frozenset({"proxy.router.parse"})

# mypy --strict: the pure layers (STYLE "Small habits").
MYPY_STRICT = ("proxy/wire", "proxy/auth", "proxy/router", "proxy/merge", "proxy/config.py",
               "proxy/errors.py")

# The classes of PostgreSQL's errcodes.txt: a string of one of these plus three characters is a
# SQLSTATE, whatever it is next to (an error's first argument, a "C" field, a default, a
# comparison). Outside errors.py each one is spelled by its name.
SQLSTATE_CLASSES = frozenset(  # errcodes.txt's "Section: Class" lines
    "00 01 02 03 08 09 0A 0B 0F 0L 0P 0Z 20 21 22 23 24 25 26 27 28 2B 2D 2F 34 38 39 3B 3D 3F "  # noqa: SIM905
    "40 42 44 53 54 55 57 58 72 F0 HV P0 XX".split())
SQLSTATE_SHAPE = re.compile(r"[0-9A-Z]{5}")


# ---------------------------------------------------------------------------------------------
# Reading the source


@dataclass(frozen=True)
class Module:
    name: str        # proxy.router.parse
    path: Path
    tree: ast.Module

    @property
    def place(self) -> str:
        """The first name under ``proxy`` ("" for the package itself): what LAYERS orders."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""

    @property
    def package(self) -> str:
        """The package a relative import in this module starts from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]

    def at(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


@dataclass(frozen=True)
class Import:
    node: ast.Import | ast.ImportFrom
    target: str      # the module it names, resolved: proxy.router.parse, asyncio, pglast.parser

    @property
    def text(self) -> str:
        return ast.unparse(self.node)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Module]:
    """Every proxy module by name, parsed."""
    found = {}
    for path in sorted(PROXY.rglob("*.py")):
        name = _module_name(path)
        found[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return found


@functools.cache
def native_modules() -> frozenset[str]:
    """The C extensions (proxy/router/_hash.c ...): modules without Python source."""
    return frozenset(_module_name(path.with_name(path.name.split(".")[0] + ".py"))
                     for pattern in ("*.c", "*.so") for path in PROXY.rglob(pattern))


def is_module(name: str) -> bool:
    return name in modules() or name in native_modules()


def imports(module: Module) -> Iterator[Import]:
    """Every import in ``module``, at any depth (in functions, under ``if TYPE_CHECKING:``), with
    the module each names: ``from ..wire import messages`` names proxy.wire.messages, ``from ..
    import __version__`` names proxy."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield Import(node, submodule if is_module(submodule) else source)


def proxy_imports(module: Module) -> Iterator[Import]:
    for imported in imports(module):
        if imported.target == "proxy" or imported.target.startswith("proxy."):
            yield imported


def place_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def report(title: str, problems: list[str]) -> str:
    return f"{title}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------
# a. The layer order


def test_every_module_has_a_layer() -> None:
    problems = [f"{module.path.relative_to(ROOT)}: {module.place!r} is in no layer; add it to LAYERS "
                f"(and to DESIGN 'Architecture')"
                for module in modules().values() if module.place not in LAYER_OF]
    assert not problems, report("modules outside the layer order", problems)


def test_imports_point_left() -> None:
    problems = []
    for module in modules().values():
        mine = LAYER_OF.get(module.place)
        for imported in proxy_imports(module):
            theirs = LAYER_OF.get(place_of(imported.target))
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{module.at(imported.node)}: `{imported.text}`: {module.place or 'proxy'} "
                                f"(layer {mine}) imports {imported.target} ({place_of(imported.target)}, "
                                f"layer {theirs}), which is to its right")
    assert not problems, report("imports against the layer order "
                                "(config, errors -> wire, auth, router, merge -> backend, fleet -> "
                                "frontend, admin, api, replication, directory -> server -> cli)",
                                problems)


# ---------------------------------------------------------------------------------------------
# b, c. What the pure layers import; who imports pglast


def test_pure_layers_import_no_io_library() -> None:
    problems = []
    for module in modules().values():
        if module.place not in PURE:
            continue
        for imported in imports(module):
            top = imported.target.split(".")[0]
            if top in IO_LIBRARIES:
                problems.append(f"{module.at(imported.node)}: `{imported.text}` ({top})")
    assert not problems, report(f"I/O libraries imported by the pure layers ({', '.join(sorted(PURE))})",
                                problems)


def test_only_router_parse_imports_pglast() -> None:
    problems = [f"{module.at(imported.node)}: `{imported.text}`"
                for module in modules().values() if module.name not in PGLAST_MODULES
                for imported in imports(module) if imported.target.split(".")[0] == "pglast"]
    assert not problems, report(f"pglast imported outside {', '.join(sorted(PGLAST_MODULES))} "
                                "(give that module what it needs instead)", problems)


# ---------------------------------------------------------------------------------------------
# d. No import cycle


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: where and how, for the failure message}.

    Every import counts, in functions and under ``if TYPE_CHECKING:`` too: a cycle that only
    works because one side imports late is still a cycle in the design. Importing ``a.b.c``
    also runs ``a/__init__.py`` and ``a/b/__init__.py``, so those are edges too, unless they
    enclose the importing module (they are then already being imported).
    """
    graph: dict[str, dict[str, str]] = {}
    for module in modules().values():
        edges = graph.setdefault(module.name, {})
        enclosing = {".".join(module.name.split(".")[:n]) for n in range(1, module.name.count(".") + 1)}
        for imported in proxy_imports(module):
            parts = imported.target.split(".")
            for n in range(2, len(parts) + 1):
                target = ".".join(parts[:n])
                if target not in enclosing and target != module.name and is_module(target):
                    edges.setdefault(target, f"{module.at(imported.node)} `{imported.text}`")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) for each strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graph is some fifty modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    found = []
    for component in components:
        start = min(component)
        paths = {start: [start]}
        queue = [start]
        while queue:  # the shortest way from start back to itself, inside the component
            node = queue.pop(0)
            if start in graph.get(node, {}):
                found.append([*paths[node], start])
                break
            for nxt in sorted(graph.get(node, {})):
                if nxt in component and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    queue.append(nxt)
    return found


def test_no_import_cycle() -> None:
    graph = import_graph()
    problems = []
    for cycle in cycles(graph):
        steps = [f"{a} -> {b}  ({graph[a][b]})" for a, b in itertools.pairwise(cycle)]
        problems.append("\n    ".join(steps))
    assert not problems, report("import cycles among proxy modules", problems)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}, "d": {"a": "d.py:1"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": ""}, "b": {}}) == []


# ---------------------------------------------------------------------------------------------
# SQLSTATEs by name


def sqlstate_names() -> dict[str, str]:
    """errors.py's table: SQLSTATE -> name."""
    names = {}
    for node in modules()["proxy.errors"].tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str) and is_sqlstate(node.value.value)):
            names[node.value.value] = node.targets[0].id
    return names


def is_sqlstate(text: str) -> bool:
    return SQLSTATE_SHAPE.fullmatch(text) is not None and text[:2] in SQLSTATE_CLASSES


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _where(parents: dict[int, ast.AST], node: ast.AST) -> str:
    parent = parents.get(id(node))
    if isinstance(parent, ast.Call):
        return f"in {ast.unparse(parent.func)}(...)"
    if isinstance(parent, ast.keyword):
        return f"as {parent.arg}="
    if isinstance(parent, ast.Compare):
        return "in a comparison"
    return ""


def test_sqlstates_are_spelled_by_name() -> None:
    names = sqlstate_names()
    problems = []
    for module in modules().values():
        if module.name == "proxy.errors":
            continue
        docstrings = _docstrings(module.tree)
        parents = {id(child): node for node in ast.walk(module.tree) for child in ast.iter_child_nodes(node)}
        constants = sorted((node for node in ast.walk(module.tree) if isinstance(node, ast.Constant)),
                           key=lambda node: (node.lineno, node.col_offset))
        for node in constants:
            value = node.value
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if id(node) not in docstrings and isinstance(text, str) and is_sqlstate(text):
                name = names.get(text)
                fix = f"use errors.{name}" if name else "name it in errors.py"
                where = _where(parents, node)
                problems.append(f"{module.at(node)}: {value!r}{' ' + where if where else ''}: {fix}")
    assert not problems, report("SQLSTATE literals outside proxy/errors.py", problems)


def test_errors_names_each_sqlstate_once() -> None:
    seen: dict[str, str] = {}
    problems = []
    for node in modules()["proxy.errors"].tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str) and is_sqlstate(node.value.value):
            name = ast.unparse(node.targets[0])
            if node.value.value in seen:
                problems.append(f"proxy/errors.py:{node.lineno}: {name} and {seen[node.value.value]} "
                                f"are both {node.value.value!r}")
            seen[node.value.value] = name
    assert not problems, report("SQLSTATEs with two names", problems)


def _errcodes_txt() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--sharedir"], capture_output=True, text=True, check=False)
        path = Path(done.stdout.strip()) / "errcodes.txt"
        if done.returncode == 0 and path.is_file():
            return path
    return next(iter(sorted(Path("/usr/share/postgresql").glob("*/errcodes.txt"), reverse=True)), None)


def test_sqlstate_names_are_postgresqls() -> None:
    path = _errcodes_txt()
    if path is None:
        pytest.skip("no errcodes.txt here (it comes with PostgreSQL's server package)")
    theirs = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 4 and is_sqlstate(fields[0]):
            theirs[fields[0]] = fields[3].upper()
    problems = [f"proxy/errors.py: {name} = {code!r}: PostgreSQL calls it "
                f"{theirs.get(code, '(nothing: not in errcodes.txt)')}"
                for code, name in sqlstate_names().items() if theirs.get(code) != name]
    assert not problems, report(f"SQLSTATE names that differ from {path}", problems)


# ---------------------------------------------------------------------------------------------
# e, f. The linters


def _tool(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    if found.exists():
        return str(found)
    pytest.skip(f"{name} is not installed next to {sys.executable}")


def test_ruff() -> None:
    done = subprocess.run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise",
                           "proxy", "tests"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"ruff check proxy tests:\n{done.stdout}{done.stderr}"


def test_mypy_strict_on_the_pure_layers(tmp_path: Path) -> None:
    done = subprocess.run([_tool("mypy"), "--strict", "--cache-dir", str(tmp_path / "mypy"),
                           "--no-error-summary", "--hide-error-context", *MYPY_STRICT],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"mypy --strict {' '.join(MYPY_STRICT)}:\n{done.stdout}{done.stderr}"
