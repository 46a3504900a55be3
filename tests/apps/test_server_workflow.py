"""The annotator's workflow through a real server with MONAI Label's own settings (datastore auto reload
and auto scoring on, as the README's command runs): Next Sample asked again while the start-up scoring
runs, saves seen by the very next listing, and every datastore endpoint, the dataset download included,
answering as MONAI Label's own local datastore does."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.datastore.local import LocalDatastore

from lib.classes import CLASS_INDEX, LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import Server, write_synthetic_checkpoint

pytestmark = pytest.mark.server

MONAI_LABEL_DEFAULTS = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true"}
K = 3  # organs per sample, as the server ran


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    studies = work / "studies"
    write_phantom(make_phantom(90, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), "case0", None)
    weights = work / "weights"
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]), seed=0)
    conf = {
        "models": "segresnet",
    "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
        "weights_dir": str(weights),
        "model_dir": str(work / "model"),
        "use_pretrained_model": "false",
        "overlap": "0",
        "organs_per_sample": str(K),
        "hold_s": "600",
    }
    srv = Server(str(studies), conf, str(work), env=dict(MONAI_LABEL_DEFAULTS, MONAI_LABEL_TASKS_TRAIN="false"))
    try:
        srv.wait_ready()
        yield {"server": srv, "work": work, "studies": studies}
    finally:
        srv.stop()


def _record(client, image_id):
    return client.datastore()["objects"][image_id]["image"]["info"].get("importance") or {}


def _wait_for_score(client, image_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = _record(client, image_id)
        if "score" in record:
            return record
        time.sleep(1)
    raise AssertionError(f"{image_id} not scored after {timeout} s")


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read()


def _send(url, method, form=None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=60) as r:
        return r.status, r.read()


def _label(env, tmp_path, name, organs):
    img = nib.load(str(env["studies"] / "case0.nii.gz"))
    lab = np.zeros(img.shape, np.uint8)
    for i, organ in enumerate(organs):
        lab[2 + 6 * i : 6 + 6 * i, 10:20, 8:16] = CLASS_INDEX[organ]
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(path))
    return str(path)


def test_the_same_annotator_asking_again_during_start_up_scoring_gets_its_image_then_its_organs(env, tmp_path):
    url = env["server"].url
    mine = MONAILabelClient(url, client_id="annotator-7", tmpdir=str(tmp_path))
    other = MONAILabelClient(url, client_id="annotator-8", tmpdir=str(tmp_path))
    # The start-up scoring runs in a subprocess that takes seconds to load the app: nothing is scored yet.
    first = mine.next_sample("importance", {})
    assert (first["id"], first["scored"]) == ("case0", False), first
    assert mine.next_sample("importance", {})["id"] == "case0"
    assert other.next_sample("importance", {}) == {}, "the one study is held for annotator-7"
    record = _wait_for_score(mine, "case0")
    assert len(record["organs"]) > K, record
    got = mine.next_sample("importance", {})
    assert (got["id"], got["score"], got["organs"]) == ("case0", record["score"], record["organs"][:K]), got
    # Only those organs are held now: another annotator gets the next ones; asking again changes nothing.
    theirs = other.next_sample("importance", {})
    assert (theirs["id"], theirs["organs"]) == ("case0", record["organs"][K : 2 * K]), theirs
    assert mine.next_sample("importance", {})["organs"] == record["organs"][:K]
    env["organs"] = record["organs"]


def _archive(url):
    status, body = _get(url + "/datastore/dataset")
    assert status == 200
    return zipfile.ZipFile(io.BytesIO(body))


def test_saves_are_listed_at_once_and_the_dataset_downloads_after_partial_and_whole_saves(env, tmp_path):
    url, studies = env["server"].url, env["studies"]
    organs = env.get("organs") or pytest.skip("needs the Next Sample test's organs")
    mine = MONAILabelClient(url, client_id="annotator-7", tmpdir=str(tmp_path))
    mine.save_label("case0", _label(env, tmp_path, "partial", organs[:K]), tag="final", params={"revised": organs[:K]})
    listed = mine.datastore()["objects"]["case0"]["labels"]["final"]["info"]["organs"]
    assert sorted(n for n, r in listed.items() if r["state"] == "revised") == sorted(organs[:K])
    # Annotator-7's organs are done: its next ask is new work (the organs nobody holds), not its old hold.
    again = mine.next_sample("importance", {})
    assert again.get("id") == "case0" and not set(again["organs"]) & set(organs[: 2 * K]), again
    stored = studies / "labels" / "final" / "case0.nii.gz"
    archive = _archive(url)
    assert sorted(archive.namelist()) == ["image/case0.nii.gz", "label/case0.nii.gz", "metadata.json"]
    assert archive.read("label/case0.nii.gz") == stored.read_bytes()
    status, body = _get(url + "/datastore/?output=train")
    assert [sorted(d) for d in json.loads(body)] == [["image", "label"]]
    # A whole-volume save, from a client that holds no organs of the image (annotator-8 holds some: its
    # save without 'revised' would count those organs, issue 24): the image leaves the pool, and no one is
    # handed it again.
    MONAILabelClient(url, client_id="lead-annotator").save_label("case0", _label(env, tmp_path, "whole", organs[:2]), tag="final")
    listed = mine.datastore()["objects"]["case0"]["labels"]["final"]["info"]["organs"]
    assert {r["state"] for r in listed.values()} == {"revised"}
    for client_id in ("annotator-7", "annotator-8", "annotator-9"):
        assert MONAILabelClient(url, client_id=client_id).next_sample("importance", {}) == {}
    assert _archive(url).read("label/case0.nii.gz") == stored.read_bytes()


def test_every_datastore_endpoint_answers_as_monai_labels_own_local_datastore(env, tmp_path):
    url, studies = env["server"].url, env["studies"]
    client = MONAILabelClient(url, client_id="annotator-7", tmpdir=str(tmp_path))
    client.save_label("case0", _label(env, tmp_path, "whole", ["liver"]), tag="final")
    extra = tmp_path / "upload" / "case1.nii.gz"
    extra.parent.mkdir()
    shutil.copyfile(studies / "case0.nii.gz", extra)
    client.upload_image(str(extra), "case1", {"source": "upload"})
    assert client.datastore()["objects"]["case1"]["image"]["info"]["source"] == "upload"
    assert _get(url + "/datastore/image?image=case1")[1] == extra.read_bytes()
    assert json.loads(_get(url + "/datastore/image/info?image=case1")[1])["source"] == "upload"
    _send(url + "/datastore/image/info?image=case1", "PUT", {"info": json.dumps({"site": "b"})})
    _send(url + "/datastore/label/info?label=case0&tag=final", "PUT", {"info": json.dumps({"checked_by": "lead"})})
    assert json.loads(_get(url + "/datastore/label/info?label=case0&tag=final")[1])["checked_by"] == "lead"
    assert client.datastore()["objects"]["case1"]["image"]["info"]["site"] == "b"
    assert _get(url + "/datastore/label?label=case0&tag=final")[1] == (studies / "labels" / "final" / "case0.nii.gz").read_bytes()
    # The same folder opened by MONAI Label's own local datastore lists, counts and exports alike.
    copy = tmp_path / "copy"
    shutil.copytree(studies, copy, ignore=shutil.ignore_patterns(".suprem", ".lock"))
    theirs = LocalDatastore(str(copy), extensions=["*.nii.gz", "*.nii"], auto_reload=False)
    assert json.loads(_get(url + "/datastore/?output=stats")[1]) == theirs.status()
    assert json.loads(_get(url + "/datastore/?output=all")[1]) == theirs.json()
    ours = [{k: os.path.relpath(v, os.path.realpath(studies)) for k, v in d.items()} for d in json.loads(_get(url + "/datastore/?output=train")[1])]
    assert ours == [{k: os.path.relpath(v, os.path.realpath(copy)) for k, v in d.items()} for d in theirs.datalist()]
    with zipfile.ZipFile(theirs.get_dataset_archive(None)) as expected:
        assert sorted(_archive(url).namelist()) == sorted(expected.namelist())
    # Removals are in the very next listing (MONAI Label leaves them to its file watcher).
    assert _send(url + "/datastore/label?id=case0&tag=final", "DELETE")[0] == 200
    assert "final" not in client.datastore()["objects"]["case0"]["labels"]
    assert _send(url + "/datastore/image?id=case1", "DELETE")[0] == 200
    assert sorted(client.datastore()["objects"]) == ["case0"]
    assert _send(url + "/datastore/image?image=case0", "HEAD")[0] == 200


@pytest.mark.parametrize(
    "method, path, status, words",
    [
        ("PUT", "/datastore/image/info?image=nope", 404, "'nope' is not in the datastore"),
        ("DELETE", "/datastore/image?id=nope", 404, "'nope' is not in the datastore"),
        ("DELETE", "/datastore/label?id=case0&tag=final", 404, "has no 'final' label"),
        ("PUT", "/datastore/label/info?label=case0&tag=final", 404, "has no 'final' label"),
        ("DELETE", "/datastore/label?id=case0&tag=..%2F..%2Fstudies", 400, "path characters"),
        ("GET", "/datastore/dataset", 404, "no final labels yet"),
    ],
)
def test_a_datastore_request_naming_what_is_not_there_gets_a_4xx_that_says_so(env, method, path, status, words):
    url = env["server"].url  # after the endpoint test: case0 has no final label left
    form = {"info": "{}"} if method == "PUT" else None
    with pytest.raises(urllib.error.HTTPError) as e:
        _send(url + path, method, form)
    assert e.value.code == status and words in e.value.read().decode(), (e.value.code, path)
    assert MONAILabelClient(url).info()["name"]  # the server keeps serving


def test_ohif_reads_monai_labels_own_app_config_followed_by_the_apps_revision_mode(env):
    """OHIF reads /ohif/app-config.js first: the server answers it with MONAI Label's own file (its data
    source, untouched) followed by the app's OHIF mode (lib/ohif/revision_mode.js, routed at
    /ohif/suprem); every other OHIF file is still MONAI Label's."""
    from lib.ohif import REVISION_ROUTE, monailabel_app_config

    url = env["server"].url
    status, body = _get(f"{url}/ohif/app-config.js")
    with open(monailabel_app_config(), "rb") as f:
        own = f.read()
    assert status == 200 and body.startswith(own), body[:300]
    mode = body[len(own) :].decode()
    assert f"routeName: '{REVISION_ROUTE}'" in mode and "window.config.modes.push" in mode, mode[:300]
    status, index = _get(f"{url}/ohif/index.html")
    assert status == 200 and b"/ohif/app-config.js" in index
