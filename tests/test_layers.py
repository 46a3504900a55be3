"""The house rule: each part of ``lib/`` imports only from the parts below it (and from itself).

Read from the source with ``ast``, imports inside functions included, so that a circle cannot come
back through a late import. ``LAYERS`` is the order, bottom first; README's "Layout" describes it.
"""

from __future__ import annotations

import ast
import os
from typing import Iterator, List, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom first. A part is a folder of lib/ or a module directly in lib/.
LAYERS = [
    "classes",  # the class tables
    "metrics",  # Dice of label maps
    "files",  # atomic writes, file versions
    "stopping",  # the stop flag, signal handlers, ending child processes
    "transforms",  # the SuPreM recipe as MONAI transforms
    "networks",  # architectures, checkpoints, sliding-window probabilities
    "weights",  # where each backbone's weights come from
    "config",  # the app's --conf (the offline ranking's too)
    "importance",  # the importance engine: formula, scorer, engines, offline ranking, records
    "errors",  # failures as HTTP answers
    "monailabel_private",  # MONAI Label's private names, in one adapter
    "ohif",  # the app's OHIF mode, served beside MONAI Label's OHIF build
    "datastore",  # MONAI Label adapters from here up
    "strategies",
    "scoring",
    "infers",
    "trainers",
    "rounds",
    "app",  # builds the tasks
]


def _part(module: str) -> str:
    """``lib.importance.rank`` -> ``importance``; ``lib.files`` -> ``files``."""
    return module.split(".")[1]


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.lineno, node.module
                if node.module in ("lib", "bench", "testing"):  # ``from lib import app``: the module lib.app
                    for alias in node.names:
                        yield node.lineno, f"{node.module}.{alias.name}"


def _python_files(folder: str) -> List[str]:
    out = []
    for root, _, names in os.walk(os.path.join(REPO, folder)):
        out += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(out)


def upward_imports(files: List[str]) -> List[str]:
    """Each import in ``files`` (under lib/) of a part above the importing one, or of a part not in LAYERS."""
    found = []
    for path in files:
        if _module_name(path) == "lib":
            continue  # lib/__init__.py: the package itself
        own = _part(_module_name(path))
        for line, name in _imports(path):
            top = name.split(".")[0]
            where = f"{os.path.relpath(path, REPO)}:{line} imports {name}"
            if top in ("tests", "testing", "bench", "apps", "support"):
                found.append(f"{where} (test or app code inside the product)")
            elif top == "lib" and "." in name:
                part = _part(name)
                if part not in LAYERS or own not in LAYERS:
                    found.append(f"{where} ({part if part not in LAYERS else own} is not in LAYERS)")
                elif LAYERS.index(part) > LAYERS.index(own):
                    found.append(f"{where} ({part} is above {own})")
    return found


def test_every_part_of_lib_imports_only_from_parts_below_it():
    files = _python_files("lib")
    assert len(files) > 30
    assert upward_imports(files) == []


def test_the_check_finds_an_upward_import_and_a_late_one(tmp_path, monkeypatch):
    # The same reading on files that break the rule: one at the top, one inside a function, one relative.
    fake = tmp_path / "lib"
    (fake / "networks").mkdir(parents=True)
    (fake / "importance").mkdir()
    (fake / "networks" / "bad.py").write_text("from lib.importance.scorer import VolumeScorer\n")
    (fake / "networks" / "late.py").write_text("def f():\n    import lib.app\n")
    (fake / "importance" / "rel.py").write_text("from ..infers import attention\n")
    (fake / "importance" / "ok.py").write_text("from lib.networks import build_network\nfrom . import records\n")
    monkeypatch.setitem(globals(), "REPO", str(tmp_path))
    found = upward_imports(_python_files("lib"))
    assert len(found) == 3, found
    assert any("bad.py:1 imports lib.importance.scorer (importance is above networks)" in f for f in found)
    assert any("late.py:2 imports lib.app" in f for f in found)
    assert any("rel.py:1 imports lib.infers" in f for f in found)


# Above lib/: testing/ (what tests and benchmarks share) may import lib; bench/ may import lib and testing.
# Neither imports the tests or the app, and testing/ does not import the benchmarks.
NOT_FROM = {
    "testing": ("tests", "support", "dicomweb_support", "ohif_support", "apps", "bench"),
    "bench": ("tests", "support", "dicomweb_support", "ohif_support", "apps"),
}


def imports_from_above(folder: str) -> List[str]:
    return [
        f"{os.path.relpath(path, REPO)}:{line} imports {name}"
        for path in _python_files(folder)
        for line, name in _imports(path)
        if name.split(".")[0] in NOT_FROM[folder]
    ]


@pytest.mark.parametrize("folder", sorted(NOT_FROM))
def test_benchmarks_and_the_shared_testing_module_import_only_what_is_below_them(folder):
    assert len(_python_files(folder)) > 2
    assert imports_from_above(folder) == []


def sys_path_edits(folder: str) -> List[str]:
    """Each ``sys.path.insert`` / ``append`` / assignment in ``folder``: its modules are imported as a package."""
    found = []
    for path in _python_files(folder):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t for t in targets if isinstance(t, ast.Attribute)), None)
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
                found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize("folder", ["lib", "bench", "testing"])
def test_no_sys_path_edits_in_the_packages(folder):
    assert sys_path_edits(folder) == []


def long_functions(folder: str, most: int = 80) -> List[str]:
    long = []
    for path in _python_files(folder):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > most:
                    long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return long


@pytest.mark.parametrize("folder", ["lib", "bench", "testing"])
def test_no_function_is_longer_than_80_lines(folder):
    assert long_functions(folder) == []


def test_the_checks_find_a_late_import_of_the_app_a_sys_path_edit_and_a_long_function(tmp_path, monkeypatch):
    (tmp_path / "lib" / "networks").mkdir(parents=True)
    (tmp_path / "lib" / "networks" / "late.py").write_text("def f():\n    from lib import app\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "a.py").write_text("import sys\nsys.path.insert(0, '..')\nfrom tests import support\n")
    (tmp_path / "bench" / "b.py").write_text("def f():\n" + "    x = 1\n" * 80)
    monkeypatch.setitem(globals(), "REPO", str(tmp_path))
    assert upward_imports(_python_files("lib")) == ["lib/networks/late.py:2 imports lib.app (app is above networks)"]
    assert sys_path_edits("bench") == ["bench/a.py:2"]
    assert imports_from_above("bench") == ["bench/a.py:3 imports tests"]
    assert long_functions("bench") == ["bench/b.py:1 f (81 lines)"]
