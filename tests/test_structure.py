"""The product's structure, read from its source: no reaching into another object's private names.

Each object talks to the next through public methods (docs/architecture.md): ``other._x`` and
``from module import _name`` hide a dependency no import shows, so a change on one side breaks the
other unseen. Your own ``self._x`` / ``cls._x`` is fine, and so are dunder names.
"""

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCT = ("supervisor", "agent_proc", "web", "corral")

# Private names of the standard library or a third party the product uses on purpose, each with why.
ALLOWED = {
    "os._exit": "a forked child must leave without running the parent's atexit hooks and buffers",
    "sys.modules['random']._inst": "the zygote reseeds random's hidden instance in each child (agent_proc/forking.py)",
    "app._make_handler": "aiohttp has no public way to answer its parser's errors in JSON (web/error_responses.py says why)",
    "sys._debugmallocstats": "CPython's only account of its allocator's free blocks, which the zygote fills "
                             "(agent_proc/immortal.py)",
}


@functools.lru_cache(maxsize=None)
def _tree(path: pathlib.Path) -> ast.Module:
    """One file's syntax tree (each file is parsed once for every test here)."""
    return ast.parse(path.read_text(), filename=str(path))


def _product_files():
    """Every Python file of the product packages."""
    for package in PRODUCT:
        yield from sorted((ROOT / package).rglob("*.py"))


def _is_private(name: str) -> bool:
    """Whether a name is private (one leading underscore, not a dunder)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """``file:line: expr`` for each reach into another object's or module's private name in one file."""
    tree = _tree(path)
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            text = f"{ast.unparse(owner)}.{node.attr}"
            if text not in ALLOWED:
                found.append(f"{where}:{node.lineno}: {text}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corral"):
            found += [f"{where}:{node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if _is_private(a.name)]
    return found


def test_no_reach_into_private_names():
    """No ``x._name`` (x not self/cls) and no ``from corral... import _name`` in the product."""
    offences = [line for path in _product_files() for line in private_reaches(path)]
    assert not offences, "reaches into private names:\n" + "\n".join(offences)


def test_the_check_finds_a_reach(tmp_path):
    """The walker itself: it reports another object's private, and not one's own or a dunder."""
    source = tmp_path / "m.py"
    source.write_text("from corral.x import _y\nclass A:\n    def f(self, o):\n"
                      "        self._own, o.__dict__\n        return o._theirs\n")
    assert private_reaches(source, tmp_path) == ["m.py:1: from corral.x import _y", "m.py:5: o._theirs"]


def _product_classes() -> dict[str, list[tuple[str, int, list[str]]]]:
    """Class name -> (file, line, the names of its bases) for every class of the product."""
    classes: dict = {}
    for path in _product_files():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
                classes.setdefault(node.name, []).append((str(path.relative_to(ROOT)), node.lineno, bases))
    return classes


def test_no_class_mixes_product_bases():
    """Parts with state of their own are held, not mixed in: no class has two or more product bases."""
    classes = _product_classes()
    offences = [f"{where}:{line}: class {name}({', '.join(bases)})"
                for name, defs in classes.items() for where, line, bases in defs
                if sum(base in classes for base in bases) >= 2]
    assert not offences, "classes with two or more product bases:\n" + "\n".join(offences)


def test_each_class_name_is_defined_once():
    """One name per thing: no two product classes share a name (an agent's BadRequest is not the API's 400)."""
    twins = {name: [f"{where}:{line}" for where, line, _ in defs]
             for name, defs in _product_classes().items() if len(defs) > 1}
    assert not twins, f"class names defined more than once: {twins}"


def _imports(path: pathlib.Path) -> set[str]:
    """The corral modules a file imports (``from corral.x import y`` counts as both corral.x and corral.x.y)."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("corral.")}


# (files, modules they must never import, why): the layers, and the parts below the registry that
# reach it only through the interfaces they declare (docs/architecture.md, "Who calls whom").
NEVER = [
    (["agent_proc/"], ("corral.supervisor", "corral.web"), "an agent process never loads the supervisor"),
    (["supervisor/"], ("corral.web",), "imports go web -> supervisor -> agent_proc"),
    (["supervisor/session_life.py", "supervisor/turns.py", "supervisor/session_host.py", "supervisor/queries.py",
      "supervisor/lifecycle.py", "supervisor/cluster/", "supervisor/store/"],
     ("corral.supervisor.registry", "corral.supervisor.supervisor"), "parts see the registry through an interface"),
    (["supervisor/store/"], ("corral.supervisor.cluster",), "the store knows no directory"),
]


def test_layers_and_parts_import_only_downward():
    """No import runs up a layer, or from a part to the registry that holds it."""
    offences = []
    for places, banned, why in NEVER:
        for path in _product_files():
            where = str(path.relative_to(ROOT))
            if not any(where == p or (p.endswith("/") and where.startswith(p)) for p in places):
                continue
            offences += [f"{where}: imports {name} ({why})" for name in sorted(_imports(path))
                         if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not offences, "\n".join(offences)


def test_each_module_name_is_used_once():
    """Modules are named by role: no two product files share a name (a package's __init__ and the routes aside)."""
    seen: dict[str, list[str]] = {}
    for path in _product_files():
        where = str(path.relative_to(ROOT))
        if path.name != "__init__.py" and not where.startswith("web/routes/"):
            seen.setdefault(path.name, []).append(where)
    twins = {name: places for name, places in seen.items() if len(places) > 1}
    assert not twins, f"module names used more than once: {twins}"
