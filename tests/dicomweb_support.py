"""A throw-away Orthanc (with its DICOMweb plugin) for tests, and the shared DICOM series made fit for it.

Orthanc comes from the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (scripts/test.sh installs
them when it runs as root). Each ``Orthanc`` here listens on a free loopback port, keeps its storage
and index in the folder it is given, answers only local requests without authentication, and has no
DICOM (DIMSE) listener.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

from support import free_port

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# The same UIDs on every run: the series keeps one id across test runs (and in logs).
_UID_SEED = "suprem-tests/totalseg-example/dicom"


def orthanc_binary() -> Optional[str]:
    return shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None


def orthanc_missing() -> Optional[str]:
    """Why an Orthanc with DICOMweb cannot be started here (None when it can)."""
    if not orthanc_binary():
        return "Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb; scripts/test.sh installs them as root)"
    if not os.path.exists(DICOMWEB_PLUGIN):
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; Debian package orthanc-dicomweb)"
    return None


class Orthanc:
    """``Orthanc <config.json>`` on 127.0.0.1:<free port>, storage in ``workdir``; its log kept for failures."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = self.url + "/dicom-web"
        self.log_path = os.path.join(workdir, "orthanc.log")
        storage = os.path.join(workdir, "storage")
        os.makedirs(storage, exist_ok=True)
        config = {
            "Name": "SuPreMTestOrthanc",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),  # unused (no DIMSE listener), but never Orthanc's default 4242
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "CheckRevisions": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        self.config_path = os.path.join(workdir, "orthanc.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=2)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [orthanc_binary(), self.config_path],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> "Orthanc":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                system = self.get("/system")
                plugins = self.get("/plugins")
                if "dicom-web" not in plugins:
                    raise RuntimeError(f"Orthanc {system.get('Version')} started without its DICOMweb plugin: {plugins}")
                return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"Orthanc not ready after {timeout} s:\n{self.log_tail()}")

    # --- REST -------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Optional[bytes] = None, ctype: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:2000].decode(errors="replace")
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {e.code}: {detail}") from None

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode()))

    def upload(self, path: str) -> Dict:
        with open(path, "rb") as f:
            res = json.loads(self.request("POST", "/instances", f.read(), "application/dicom"))
        if res.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {path}: {res}")
        return res

    def find_series(self, **query: str) -> List[Dict]:
        """Series (with their main DICOM tags) matching ``query``, e.g. ``Modality="SEG"``."""
        return self.post("/tools/find", {"Level": "Series", "Query": query, "Expand": True})

    def series_instances(self, orthanc_series_id: str) -> List[Dict]:
        return self.get(f"/series/{orthanc_series_id}/instances")

    def instance_file(self, orthanc_instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_instance_id}/file")

    # --- end --------------------------------------------------------------------------------------
    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self):
        """SIGTERM, then wait for the exit (its SQLite index stays locked until then)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()


def series_uids(copy: int = 0) -> Tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) given to the shared series (``copy`` > 0: to another copy of
    it, a study of its own): the same on every run."""
    from pydicom.uid import generate_uid

    seed = _UID_SEED if not copy else f"{_UID_SEED}#{copy}"
    return generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "series"])


def prepare_series(src_dir: str, out_dir: str, copy: int = 0) -> Tuple[str, str, List[str]]:
    """Copies of the shared series that a PACS takes: decompressed, with consistent UIDs.

    The shared files are JPEG 2000 (lossless) with empty Study/Series/SOP Instance UIDs, and an empty
    SOP Class UID too. Each copy is decoded with pydicom (pylibjpeg-openjpeg), written as Explicit
    VR Little Endian, and gets the study and series UIDs of ``series_uids()``, its own SOP Instance
    UID and its SOP Class UID from the file meta header (where the anonymiser left them). Orthanc
    stores a file without a SOP Class UID, but dcmqi's itkimage2segimage cannot reference it from a
    DICOM SEG ("Condition failed: Missing value"). ``copy`` > 0: another patient's study with the same
    pixels (every UID its own). Returns (study UID, series UID, files).
    """
    import pydicom
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study_uid, series_uid = series_uids(copy)
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for src in sorted(glob.glob(os.path.join(src_dir, "*"))):
        ds = pydicom.dcmread(src)
        ds.decompress()  # JPEG 2000 -> native pixels, Explicit VR Little Endian
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, ds.file_meta.TransferSyntaxUID
        sop_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID") or "") or generate_uid(
            entropy_srcs=[_UID_SEED, os.path.basename(src)]
        )
        if copy:
            sop_uid = generate_uid(entropy_srcs=[_UID_SEED, str(copy), sop_uid])
            ds.PatientID = f"{ds.get('PatientID', '')}-{copy}"
        sop_class = str(ds.get("SOPClassUID") or "") or str(ds.file_meta.get("MediaStorageSOPClassUID") or "")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class or CTImageStorage
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        dst = os.path.join(out_dir, f"{sop_uid}.dcm")
        ds.save_as(dst, write_like_original=False)
        files.append(dst)
    if not files:
        raise FileNotFoundError(f"no DICOM files in {src_dir}")
    return study_uid, series_uid, files


@contextmanager
def loaded_orthanc(work: str, series_dir: str, copies: int = 1):
    """An Orthanc (DICOMweb) in ``work`` holding the series of ``series_dir``, prepared by
    ``prepare_series``; ``study_uid``, ``series_uid`` and ``files`` are set on it. ``copies`` > 1: as many
    studies of it, each with its own UIDs; ``series`` maps each series UID to (study UID, files). Stopped
    on exit."""
    made = [prepare_series(series_dir, os.path.join(work, "upload" + (f"-{c}" if c else "")), c) for c in range(copies)]
    o = Orthanc(work)
    try:
        o.wait_ready()
        for _, _, files in made:
            for f in files:
                o.upload(f)
        o.study_uid, o.series_uid, o.files = made[0]
        o.series = {series: (study, files) for study, series, files in made}
        yield o
    finally:
        o.stop()


def trainer_view(cache_path, organs) -> Dict[str, List[str]]:
    """``revised_by_image`` of the app's DICOMweb datastore on a server's cache folder
    (``MONAI_LABEL_DICOMWEB_CACHE_PATH``), as a round reads it, by series UID: the organs the trainer masks
    its loss with. A copy is read: opening a datastore may write its record."""
    from monailabel.datastore.local import LocalDatastore

    from lib.classes import label_dict
    from lib.datastore.dicomweb import CheckedDICOMWebDatastore

    (folder,) = [p for p in glob.glob(os.path.join(str(cache_path), "*")) if os.path.isdir(p) and not p.endswith("-read")]
    copy = folder + "-read"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    ds = object.__new__(CheckedDICOMWebDatastore)
    LocalDatastore.__init__(ds, copy, auto_reload=False)
    ds.set_labels(label_dict(organs))
    return {os.path.basename(p)[: -len(".nii.gz")]: sorted(v) for p, v in ds.revised_by_image().items()}


@contextmanager
def dicomweb_server(orthanc, work, env: Optional[Dict[str, str]] = None, **conf):
    """A real ``monailabel start_server`` on Orthanc's DICOMweb, ready, stopped at the end (Orthanc's log
    printed if it does not start), with a synthetic SegResNet, the reference importance score the DICOMweb
    tests were written for, no overlap, and the series' cache (DICOM files and their NIfTI) in ``work``
    (``.cache``), not ~/.cache; ``conf`` adds or overrides ``--conf`` keys, ``env`` the server's
    environment."""
    from support import Server, write_synthetic_checkpoint

    write_synthetic_checkpoint("segresnet", str(work / "weights" / "supervised_suprem_segresnet_2100.pth"))
    settings = {
        "models": "segresnet",
        "importance_mode": "reference",
        "weights_dir": str(work / "weights"),
        "model_dir": str(work / "model"),
        "use_pretrained_model": "false",
        "overlap": "0",
        **conf,
    }
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicom-cache"), **(env or {})}
    srv = Server(orthanc.dicomweb, settings, str(work), env=env)
    srv.cache = work / "dicom-cache"
    try:
        yield srv.wait_ready()
    except Exception:
        print(orthanc.log_tail())
        raise
    finally:
        srv.stop()
