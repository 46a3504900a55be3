"""MONAI Label's private names this app relies on (pinned: monailabel 0.8.5), in one place.

Each is used because MONAI Label offers no public way to do what the line beside it says. A MONAI Label
upgrade that renames or drops one fails ``tests/test_monailabel_private.py``, which resolves every name
in ``PRIVATE_NAMES`` and checks that no other module touches them.

Where MONAI Label has public API the app uses it instead: ``BasicTrainTask.config()`` (not ``_config``),
its constructor's checkpoint names (not ``_final_filename`` ...), ``train_data_loader`` /
``val_data_loader`` and ``train_handlers`` (not ``_dataset`` / ``_create_trainer``), ``load_path``
(not ``_load_checkpoint``), ``MONAILabelApp.server_mode`` (not ``_server_mode``), the app's own task
tables (not ``_infers``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

MONAILABEL_VERSION = "0.8.5"

_CHECKED = "lib/datastore/checked.py"
_DICOMWEB = "lib/datastore/dicomweb.py"
_HERE = "lib/monailabel_private.py"
_LOCAL = "monailabel.datastore.local:LocalDatastore"
_ASYNC = "monailabel.utils.async_tasks.utils"

# "module:Class.attribute" (or "module:name") -> (why, the modules that may touch it). The datastore's
# names are still used in its own modules (lib/datastore, under rework for issue 25), listed there.
PRIVATE_NAMES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    f"{_ASYNC}:background_executors": (
        "the queues (one executor per kind) of train / scoring requests: a stopping server cancels what waits",
        (_HERE,),
    ),
    f"{_ASYNC}:background_tasks": ("the requests' records: those still waiting are marked STOPPED", (_HERE,)),
    f"{_ASYNC}:background_processes": ("MONAI Label's per-kind process tables, made before a queue is shut", (_HERE,)),
    "concurrent.futures.thread:ThreadPoolExecutor._threads": (
        "(Python's) whether a queue's thread may be between taking a request and starting its process",
        (_HERE,),
    ),
    "monailabel.interfaces.app:MONAILabelApp._init_dicomweb_datastore": (
        "builds the DICOMweb datastore from MONAI Label's settings (client, credentials, cache); the app "
        "re-types the object it built (``retype``) rather than copy that construction",
        (_HERE,),
    ),
    f"{_LOCAL}._datastore": ("the in-memory datastore record, read and swapped whole under the file lock", (_CHECKED, _DICOMWEB)),
    f"{_LOCAL}._datastore_path": ("the studies folder the record belongs to", (_CHECKED,)),
    f"{_LOCAL}._datastore_config_path": ("the record's file, written whole under the app's file lock", (_CHECKED,)),
    f"{_LOCAL}._config_ts": ("the watcher's time stamp of the record file, set after the app writes it", (_CHECKED,)),
    f"{_LOCAL}._ignore_event_config": ("keeps MONAI Label's watcher from reloading a file the app just wrote", (_CHECKED,)),
    f"{_LOCAL}._extensions": ("the file patterns MONAI Label lists images and labels by", (_CHECKED,)),
    f"{_LOCAL}._list_files": ("MONAI Label's listing of a folder, which its reconcile compares with", (_CHECKED,)),
    f"{_LOCAL}._filename": ("MONAI Label's rule from an id to a file name", (_CHECKED,)),
    f"{_LOCAL}._to_id": ("MONAI Label's rule from a file name to an id and extension", (_CHECKED,)),
    f"{_LOCAL}._init_from_datastore_file": ("reloads the record another process wrote", (_CHECKED,)),
    f"{_LOCAL}._update_datastore_file": (
        "writes the record; overridden so every write is atomic and under the app's file lock",
        (_CHECKED,),
    ),
    "monailabel.datastore.dicom:DICOMWebDatastore._client": ("the DICOMweb client a SEG series is fetched with", (_DICOMWEB,)),
    "monailabel.datastore.dicom:DICOMWebDatastore._fetch_by_frame": ("MONAI Label's fetch setting for that download", (_DICOMWEB,)),
    "monailabel.datastore.dicom:DICOMWebDatastore._convert_to_nifti": ("whether labels are kept as NIfTI", (_DICOMWEB,)),
    "monailabel.datastore.dicom:DICOMWebDatastore._dicom_info": ("the label info MONAI Label keeps for a series", (_DICOMWEB,)),
}


def retype(obj, cls):
    """``obj`` (built by MONAI Label) as an instance of ``cls``, a subclass of its class adding no state
    of its own: MONAI Label builds its DICOMweb datastore in the private ``_init_dicomweb_datastore``."""
    if not isinstance(obj, cls.__mro__[1]):
        raise TypeError(f"{type(obj).__name__} is not a {cls.__mro__[1].__name__}")
    obj.__class__ = cls
    return obj


def cancel_queued_tasks(kinds=("train", "scoring", "batch_infer")) -> List:
    """MONAI Label runs train / scoring / batch-infer requests as subprocesses fed by one queue per kind:
    cancel the requests waiting, refuse new ones (their queue is shut down; a later request gets an error,
    not a process) and mark them STOPPED. Returns the queues' executors."""
    from concurrent.futures import ThreadPoolExecutor

    from monailabel.utils.async_tasks import utils as async_tasks

    executors = async_tasks.background_executors
    for kind in kinds:
        async_tasks.background_tasks.setdefault(kind, [])
        async_tasks.background_processes.setdefault(kind, {})
        if executors.get(kind) is None:
            executors[kind] = ThreadPoolExecutor(max_workers=1)
    for kind, executor in executors.items():
        executor.shutdown(wait=False, cancel_futures=True)
        for task in async_tasks.background_tasks.get(kind, []):
            if task.get("status") == "SUBMITTED":
                task["status"] = "STOPPED"
    return list(executors.values())


def queue_threads_alive(executors) -> bool:
    """Whether a queue's thread is alive: it may be between taking a request and starting its process."""
    return any(t.is_alive() for ex in executors for t in getattr(ex, "_threads", ()))
