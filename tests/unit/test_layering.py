"""How the hooks' modules lean on each other: one way, never in a circle.

Every import counts, those inside functions and lazy.module() ones too:
a module that reaches back up for what it needs drags the upper one's
imports and state into every caller (issue 9, Shape).
"""

import ast
import os

import nbdsnap.hooks

HOOKS = os.path.dirname(nbdsnap.hooks.__file__)


def imports(name):
    """The sibling modules that hooks/NAME.py imports, however it does."""
    with open(os.path.join(HOOKS, name + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module
                         else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("nbdsnap.hooks."):
            found.add(node.module.split(".")[2])
        elif (isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute)
              and node.func.attr == "module"
              and isinstance(node.func.value, ast.Name)
              and node.func.value.id == "lazy"):
            found.add(node.args[0].value)
    return {m.split(".")[0] for m in found} - {name}


def graph():
    names = [n[:-3] for n in os.listdir(HOOKS)
             if n.endswith(".py") and n != "__init__.py"]
    return {n: imports(n) & set(names) for n in names}


def test_freeze_and_recover_do_not_lean_on_each_other():
    g = graph()
    assert "recover" not in g["freeze"]
    assert "freeze" not in g["recover"]


def test_only_cli_imports_the_commands():
    g = graph()
    assert {n for n, deps in g.items() if "freeze" in deps} == {"cli"}
    assert {n for n, deps in g.items() if "recover" in deps} == {"cli"}


def test_the_imports_go_one_way():
    g = graph()
    done, path = set(), []

    def visit(name):
        assert name not in path, " -> ".join(path + [name])
        if name in done:
            return
        path.append(name)
        for dep in sorted(g[name]):
            visit(dep)
        path.pop()
        done.add(name)
    for name in sorted(g):
        visit(name)
