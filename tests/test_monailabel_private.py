"""The contract with MONAI Label's private API: every private name the app relies on is listed in
``lib/monailabel_private.py`` with why, exists in the pinned monailabel, and is touched only where listed."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
from typing import List, Set

import monailabel
import pytest

from lib.monailabel_private import MONAILABEL_VERSION, PRIVATE_NAMES, LocalDatastoreHooks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolves(name: str) -> bool:
    """``module:Class.attr`` is a class attribute or an attribute some class in its MRO assigns
    (``self.attr =``); ``module:name`` a module attribute."""
    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    *owners, attr = path.split(".")
    for part in owners:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    if hasattr(obj, attr):
        return True
    if not inspect.isclass(obj):
        return False
    assigned = re.compile(rf"self\.{re.escape(attr)}\s*(:[^=]*)?=")
    return any(assigned.search(inspect.getsource(c)) for c in obj.__mro__ if c.__module__.startswith(("monailabel", "concurrent")))


def test_monailabel_is_the_pinned_version():
    # An upgrade must come with a fresh read of every name below (and this pin moved).
    assert monailabel.__version__.split("+")[0] == MONAILABEL_VERSION


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_each_private_name_exists_in_monailabel(name):
    assert resolves(name), f"{name} is gone from monailabel {monailabel.__version__}: {PRIVATE_NAMES[name][0]}"


def test_the_check_notices_a_name_that_is_gone():
    assert resolves("monailabel.datastore.local:LocalDatastore._update_datastore_file")
    assert resolves("monailabel.datastore.local:LocalDatastore._datastore_config_path")  # set in __init__
    assert not resolves("monailabel.datastore.local:LocalDatastore._no_such_thing")
    assert not resolves("monailabel.utils.async_tasks.utils:no_such_table")


def _sources():
    for root in ("lib", "apps"):
        for folder, _, names in os.walk(os.path.join(REPO, root)):
            for n in names:
                if n.endswith(".py"):
                    path = os.path.join(folder, n)
                    yield os.path.relpath(path, REPO), open(path).read()


def test_private_names_are_touched_only_where_listed():
    outside = []
    for rel, text in _sources():
        for name, (_, where) in PRIVATE_NAMES.items():
            attr = name.rpartition(".")[2] if "." in name.partition(":")[2] else name.partition(":")[2]
            if rel not in where + ("lib/monailabel_private.py",) and re.search(rf"\.{re.escape(attr)}\b", text):
                outside.append(f"{rel} touches {name}")
    assert outside == []


def test_the_app_reads_no_private_name_of_the_app_or_train_task_base_classes():
    # Those with public API: BasicTrainTask.config(), MONAILabelApp.server_mode(), the app's own tables.
    gone = ("_config", "_model_dir", "_key_metric_filename", "_final_filename", "_model_dict_key",
            "_validate_transforms", "_dataset", "_create_trainer", "_load_checkpoint", "_server_mode", "_infers",
            "_iteration")
    found = [f"{rel}: {n}" for rel, text in _sources() for n in gone if re.search(rf"\.{n}\b|def {n}\b", text)]
    assert found == []


def _monailabel_privates(classes) -> Set[str]:
    """The private names (``_x``, not dunder) the MONAI Label classes in ``classes``' MROs define or assign."""
    names: Set[str] = set()
    for cls in classes:
        for c in cls.__mro__:
            if not c.__module__.startswith("monailabel"):
                continue
            names |= {n for n in vars(c) if n.startswith("_") and not n.startswith("__")}
            names |= set(re.findall(r"self\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)", inspect.getsource(c)))
    return names


def private_uses(path: str) -> List[str]:
    """Each attribute read or method defined in ``path`` that is a private name of a MONAI Label class the
    file imports: what a subclass of MONAI Label's datastore or tasks touches beside the adapter."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    classes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("monailabel"):
            module = importlib.import_module(node.module)
            classes += [getattr(module, a.name) for a in node.names if inspect.isclass(getattr(module, a.name, None))]
    private = _monailabel_privates(classes)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno} reads {node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno} overrides {node.name}")
    return found


def test_no_module_but_the_adapter_reads_or_overrides_a_private_name_of_the_monailabel_classes_it_imports():
    # An override of a private hook is the silent kind of breakage: renamed in MONAI Label, it is no
    # longer called. The adapter overrides them and routes each to a public method.
    found = [u for rel, _ in _sources() if rel != "lib/monailabel_private.py" for u in private_uses(os.path.join(REPO, rel))]
    assert found == []


def test_the_scan_finds_a_private_read_and_a_private_override(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from monailabel.datastore.local import LocalDatastore\n"
        "class D(LocalDatastore):\n"
        "    def _reconcile_datastore(self):\n"
        "        return self._datastore, self._lock_file, self._known\n"
    )
    assert [u.split(" ", 1)[1] for u in private_uses(str(bad))] == [
        "overrides _reconcile_datastore", "reads _datastore", "reads _lock_file"
    ]


def test_the_adapter_overrides_every_private_hook_it_lists_and_monailabel_calls_them(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    hooks = {n for n in vars(LocalDatastoreHooks) if n.startswith("_") and not n.startswith("__")}
    assert hooks == {"_update_datastore_file", "_init_from_datastore_file", "_reconcile_datastore"}
    assert all(f"monailabel.datastore.local:LocalDatastore.{h}" in PRIVATE_NAMES for h in hooks)
    calls = []

    class Recording(LocalDatastoreHooks, LocalDatastore):
        def write_record(self, lock=True):
            calls.append("write")
            super().write_record(lock)

        def reload_record(self, throw_exception=False):
            calls.append("reload")
            super().reload_record(throw_exception)

        def reconcile(self):
            calls.append("reconcile")
            super().reconcile()

    (tmp_path / "a.nii.gz").write_bytes(b"")
    ds = Recording(str(tmp_path), auto_reload=False)
    assert "reconcile" in calls and "write" in calls  # MONAI Label's start: reconcile, then write the record
    assert ds.record.objects.keys() == {"a"} and ds.split_name("a.nii.gz") == ("a", ".nii.gz")
    assert ds.file_name("a", ".nii.gz") == "a.nii.gz" and list(ds.matching_files(str(tmp_path))) == ["a.nii.gz"]
    assert os.path.exists(ds.record_path) and ds.studies_path == str(tmp_path)
    calls.clear()
    ds.update_image_info("a", {"x": 1})
    ds.refresh()
    assert calls[0] == "write" and "reconcile" in calls
