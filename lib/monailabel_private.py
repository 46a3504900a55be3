"""MONAI Label's private names this app relies on (pinned: monailabel 0.8.5), in one place.

Each is used because MONAI Label offers no public way to do what the line beside it says. A MONAI Label
upgrade that renames or drops one fails ``tests/test_monailabel_private.py``, which resolves every name
in ``PRIVATE_NAMES`` and checks that no other module touches them.

Its datastore's private record, file rules and hooks are reached through ``LocalDatastoreHooks`` (a base
of the app's datastores), the DICOMweb datastore's settings through the functions below it.

Where MONAI Label has public API the app uses it instead: ``BasicTrainTask.config()`` (not ``_config``),
its constructor's checkpoint names (not ``_final_filename`` ...), ``train_data_loader`` /
``val_data_loader`` and ``train_handlers`` (not ``_dataset`` / ``_create_trainer``), ``load_path``
(not ``_load_checkpoint``), ``MONAILabelApp.server_mode`` (not ``_server_mode``), the app's own task
tables (not ``_infers``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Tuple

from filelock import FileLock

MONAILABEL_VERSION = "0.8.5"

_HERE = "lib/monailabel_private.py"
_LOCAL = "monailabel.datastore.local:LocalDatastore"
_ASYNC = "monailabel.utils.async_tasks.utils"

# "module:Class.attribute" (or "module:name") -> (why, the modules that may touch it: this one).
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
    f"{_LOCAL}._datastore": ("the in-memory datastore record, read and swapped whole under the file lock", (_HERE,)),
    f"{_LOCAL}._datastore_path": ("the studies folder the record belongs to", (_HERE,)),
    f"{_LOCAL}._datastore_config_path": ("the record's file, written whole under the app's file lock", (_HERE,)),
    f"{_LOCAL}._config_ts": ("the watcher's time stamp of the record file, set after the app writes it", (_HERE,)),
    f"{_LOCAL}._ignore_event_config": ("keeps MONAI Label's watcher from reloading a file the app just wrote", (_HERE,)),
    f"{_LOCAL}._extensions": ("the file patterns MONAI Label lists images and labels by", (_HERE,)),
    f"{_LOCAL}._list_files": ("MONAI Label's listing of a folder, which its reconcile compares with", (_HERE,)),
    f"{_LOCAL}._filename": ("MONAI Label's rule from an id to a file name", (_HERE,)),
    f"{_LOCAL}._to_id": ("MONAI Label's rule from a file name to an id and extension", (_HERE,)),
    f"{_LOCAL}._init_from_datastore_file": (
        "MONAI Label's reload of the record (its watcher and listings call it); overridden so a reload takes "
        "the app's file lock and swaps the record whole",
        (_HERE,),
    ),
    f"{_LOCAL}._update_datastore_file": (
        "MONAI Label's write of the record (after every change it makes); overridden so every write is atomic "
        "and under the app's file lock",
        (_HERE,),
    ),
    f"{_LOCAL}._reconcile_datastore": (
        "MONAI Label's reconcile with the files on disk (at start and from its watcher); overridden so it runs "
        "on the file's current record under the lock",
        (_HERE,),
    ),
    "monailabel.datastore.dicom:DICOMWebDatastore._client": (
        "the DICOMweb client a SEG series is fetched and the SEGs of one series are searched with",
        (_HERE,),
    ),
    "monailabel.datastore.dicom:DICOMWebDatastore._fetch_by_frame": ("MONAI Label's fetch setting for that download", (_HERE,)),
    "monailabel.datastore.dicom:DICOMWebDatastore._convert_to_nifti": ("whether labels are kept as NIfTI", (_HERE,)),
    "monailabel.datastore.dicom:DICOMWebDatastore._dicom_info": ("the label info MONAI Label keeps for a series", (_HERE,)),
}


def retype(obj, cls):
    """``obj`` (built by MONAI Label) as an instance of ``cls``, a subclass of its class adding no state
    of its own: MONAI Label builds its DICOMweb datastore in the private ``_init_dicomweb_datastore``."""
    base = next(c for c in cls.__mro__[1:] if c.__module__.startswith("monailabel"))
    if not isinstance(obj, base):
        raise TypeError(f"{type(obj).__name__} is not a {base.__name__}")
    obj.__class__ = cls
    return obj


class LocalDatastoreHooks:
    """Put first among the bases of a ``LocalDatastore`` subclass: MONAI Label's private record, file rules
    and hooks under public names, so that the subclass touches none of them.

    MONAI Label calls three private hooks; each is routed to a public method that by default does what
    MONAI Label does and that the subclass overrides: ``write_record`` (``_update_datastore_file``),
    ``reload_record`` (``_init_from_datastore_file``), ``reconcile`` (``_reconcile_datastore``).
    """

    # --- MONAI Label's hooks --------------------------------------------------------------------------
    def _update_datastore_file(self, lock=True):
        self.write_record(lock)

    def _init_from_datastore_file(self, throw_exception=False):
        self.reload_record(throw_exception)

    def _reconcile_datastore(self):
        self.reconcile()

    def write_record(self, lock: bool = True) -> None:
        """Write the record to its file (``lock``: under MONAI Label's own file lock)."""
        super()._update_datastore_file(lock)

    def reload_record(self, throw_exception: bool = False) -> None:
        """Reload the record from its file when another writer changed it."""
        super()._init_from_datastore_file(throw_exception)

    def reconcile(self) -> None:
        """Bring the record in line with the image and label files on disk."""
        super()._reconcile_datastore()

    @contextmanager
    def record_writing(self):
        """Hold MONAI Label's datastore lock while the record changes, then write it (its ``save_label``'s way)."""
        with FileLock(self._lock_file):
            yield
            self.write_record(lock=False)

    # --- MONAI Label's state and rules ----------------------------------------------------------------
    @property
    def record(self):
        """The datastore record (MONAI Label's ``LocalDatastoreModel``) as this process holds it."""
        return self._datastore

    @record.setter
    def record(self, model) -> None:
        self._datastore = model

    @property
    def record_path(self) -> str:
        """The record's file (``datastore_v2.json`` in the studies folder)."""
        return self._datastore_config_path

    @property
    def studies_path(self) -> str:
        return self._datastore_path

    def ignore_next_record_event(self) -> None:
        """MONAI Label's watcher (auto reload) skips the record file's next change: the app's own write."""
        self._ignore_event_config = True

    def stamp_record(self, mtime: float) -> None:
        """The record file's modification time as last read or written here (MONAI Label's reload compares it)."""
        self._config_ts = mtime

    def matching_files(self, folder: str) -> Dict[str, str]:
        """The files in ``folder`` MONAI Label takes for images or labels (its extensions), name -> name."""
        return self._list_files(folder, self._extensions)

    def file_name(self, image_id: str, ext: str) -> str:
        """MONAI Label's file name for an id and an extension."""
        return self._filename(image_id, ext)

    def split_name(self, name: str) -> Tuple[str, str]:
        """MONAI Label's (id, extension) of a file name."""
        return self._to_id(name)


def download_dicomweb_series(datastore, series_id: str, folder: str) -> None:
    """Fetch a DICOMweb series (a SEG) into ``folder`` with the datastore's own client and fetch setting."""
    from monailabel.datastore.utils.dicom import dicom_web_download_series

    dicom_web_download_series(None, series_id, folder, datastore._client, datastore._fetch_by_frame)


def dicomweb_client(datastore):
    """The DICOMweb client (``dicomweb_client.DICOMwebClient``) the datastore talks to its PACS with."""
    return datastore._client


def dicomweb_keeps_nifti(datastore) -> bool:
    """Whether the DICOMweb datastore keeps labels as NIfTI (MONAI Label's ``convert_to_nifti`` setting)."""
    return bool(datastore._convert_to_nifti)


def dicomweb_label_info(datastore, series_id: str) -> Dict:
    """The label info MONAI Label keeps for a DICOMweb series."""
    return datastore._dicom_info(series_id)


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
