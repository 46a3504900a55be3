"""The contract with MONAI Label's private API: every private name the app relies on is listed in
``lib/monailabel_private.py`` with why, exists in the pinned monailabel, and is touched only where listed."""

from __future__ import annotations

import importlib
import inspect
import os
import re

import monailabel
import pytest

from lib.monailabel_private import MONAILABEL_VERSION, PRIVATE_NAMES

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
