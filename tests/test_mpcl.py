"""The package as a whole: its import graph, what its docs name, and how callbacks treat the
module. Each check reads the source (``ast``), so a function-local import counts too (those
under ``if TYPE_CHECKING:`` do not: they never run)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import mpcl

SRC = Path(mpcl.__file__).parent
ROOT = SRC.parent.parent
ENTRY_POINTS = ("mpcl.train", "mpcl.eval", "mpcl.predict", "mpcl.prepare")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The ``mpcl`` modules ``path`` imports anywhere in its body (``from mpcl.a import b``
    counts as ``mpcl.a.b`` when that is a module, else ``mpcl.a``)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {  # ``if TYPE_CHECKING:`` imports never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mpcl"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            if base.split(".")[0] != "mpcl":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_src():
    graph = import_graph()
    assert "mpcl.run.cli" in graph and graph["mpcl.train"]  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_entry_points_import_none_of_each_other():
    graph = import_graph()
    for entry in ENTRY_POINTS:
        others = graph[entry] & set(ENTRY_POINTS)
        assert not others, f"{entry} imports {sorted(others)}"


def test_the_top_of_the_package_stays_small():
    top = [p.stem for p in SRC.glob("*.py") if f"mpcl.{p.stem}" not in ENTRY_POINTS]
    top.remove("__init__")
    assert len(top) <= 10, sorted(top)


def test_error_types_live_in_one_module():
    """Every exception class of the package is defined in mpcl.errors."""
    defined = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                re.search(r"(Error|Exception|Diverged|Interrupted)$", ast.unparse(b))
                for b in node.bases
            ):
                defined.append(f"{name}.{node.name}")
    assert defined and all(d.startswith("mpcl.errors.") for d in defined), defined


def _callback_classes(tree: ast.AST) -> list[ast.ClassDef]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef)
        and any(re.search(r"Callback|ProgressBar|ModelCheckpoint", ast.unparse(b)) for b in n.bases)
    ]


def _module_writes(cls: ast.ClassDef) -> list[str]:
    """Assignments to (or setattr on) a hook's LightningModule argument inside ``cls``."""
    found = []
    for fn in (n for n in ast.walk(cls) if isinstance(n, ast.FunctionDef)):
        args = [a.arg for a in fn.args.args][2:3]  # (self, trainer, pl_module, ...)
        names = set(args) & {"pl_module", "module"}
        for node in ast.walk(fn):
            targets = []
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    if t.value.id in names:
                        found.append(f"{cls.name}.{fn.name}: {ast.unparse(t)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr":
                if node.args and ast.unparse(node.args[0]) in names:
                    found.append(f"{cls.name}.{fn.name}: {ast.unparse(node)}")
    return found


def test_the_writes_check_catches_a_callback_that_patches_the_module():
    planted = ast.parse(
        "class Bad(L.Callback):\n"
        "    def on_train_start(self, trainer, pl_module):\n"
        "        pl_module.log = print\n"
    )
    assert _module_writes(_callback_classes(planted)[0]) == ["Bad.on_train_start: pl_module.log"]


def test_no_callback_assigns_to_the_lightning_module():
    classes = []
    for path in SRC.rglob("*.py"):
        for cls in _callback_classes(ast.parse(path.read_text())):
            classes.append(cls.name)
            assert not _module_writes(cls), _module_writes(cls)
    assert {"DivergenceGuard", "DebugImages", "Figures", "WandbExtras"} <= set(classes)


# ---------------------------------------------------------------------------- docs
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# ``mpcl.a.b`` in prose or code; not ``${mpcl.resolver:}``, not file paths (``.py``/``.yaml``).
_NAME = re.compile(r"(?<![\w${/.-])mpcl(?:\.[A-Za-z_]\w*)+(?![\w/-]|\.(?:py|yaml|ckpt)\b)")


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the doc names something gone
        return obj
    raise ModuleNotFoundError(dotted)


def _doc_names() -> list[tuple[str, str]]:
    names = []
    for doc in DOCS:
        for name in sorted(set(_NAME.findall(doc.read_text()))):
            names.append((doc.name, name))
    return names


def test_docs_name_python_objects():
    names = _doc_names()
    assert len(names) > 20 and ("README.md", "mpcl.train") in names


@pytest.mark.parametrize(("doc", "name"), _doc_names())
def test_every_mpcl_name_in_the_docs_imports(doc, name):
    _resolve(name)


def test_the_docs_check_catches_a_stale_name():
    with pytest.raises((AttributeError, ModuleNotFoundError)):
        _resolve("mpcl.prototypes.banks.CentroidPrototypes")
