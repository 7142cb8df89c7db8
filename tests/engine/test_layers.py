"""Imports point down: app -> tasks -> geometry / sims / render / viz -> engine.

Every import in the package (function-level ones too) is read from the source, so a new module
that reaches upwards fails here rather than in a review.
"""

import ast
import pathlib

import diffworld

ROOT = pathlib.Path(diffworld.__file__).parent
LEVEL = {"engine": 0, "geometry": 1, "sims": 1, "render": 1, "viz": 1, "tasks": 2, "app": 3}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if node.module == "diffworld")


def test_every_import_points_down():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] == "__init__":
            continue
        here = LEVEL[parts[0]]
        for name in _imports(path):
            bits = name.split(".")
            if bits[0] != "diffworld" or len(bits) < 2 or bits[1] not in LEVEL:  # e.g. __version__
                continue
            if LEVEL[bits[1]] > here:
                bad.append(f"{'/'.join(parts)}.py imports {name}")
    assert not bad, "\n".join(bad)


def test_every_package_has_a_level():
    top = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert top == set(LEVEL)
