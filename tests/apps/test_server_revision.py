"""Organ-level revision through a real server and MONAI Label's client: Submit Label names the revised
organs, revised voxels are never lost, Next Sample hands out the organs still to revise, /info/ counts."""

from __future__ import annotations

import json
import threading
from urllib.request import Request, urlopen

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.classes import CLASS_INDEX, LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import Server, write_synthetic_checkpoint

pytestmark = pytest.mark.server

PHANTOMS = ["rv_a", "rv_b", "rv_c"]
ORGANS = LABEL_SETS["atlas25"]
LIVER, PANCREAS, SPLEEN, STOMACH = (CLASS_INDEX[n] for n in ("liver", "pancreas", "spleen", "stomach"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("revision")
    studies = work / "studies"
    for i, name in enumerate(PHANTOMS):
        write_phantom(make_phantom(60 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), name, None)
    weights = work / "weights"
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]), seed=0)
    conf = {
        "models": "segresnet",
        "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
        "weights_dir": str(weights),
        "model_dir": str(work / "model"),
        "use_pretrained_model": "false",
        "overlap": "0",
        "organs_per_sample": "2",
    }
    srv = Server(str(studies), conf, str(work), env={"MONAI_LABEL_TASKS_TRAIN": "false"})
    try:
        srv.wait_ready()
        yield {"server": srv, "work": work, "studies": studies}
    finally:
        srv.stop()


def _label(env, tmp_path, image_id, name, boxes):
    """A label file on the image's grid: ``boxes`` = [(class index, (slice, slice, slice)), ...]."""
    img = nib.load(str(env["studies"] / f"{image_id}.nii.gz"))
    lab = np.zeros(img.shape, np.uint8)
    for value, box in boxes:
        lab[box] = value
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(path))
    return str(path), lab


def _stored(env, image_id):
    return np.asarray(nib.load(str(env["studies"] / "labels" / "final" / f"{image_id}.nii.gz")).dataobj)


def _organs(client, image_id):
    return client.datastore()["objects"][image_id]["labels"]["final"]["info"]["organs"]


def _box(x0, x1):
    return (slice(x0, x1), slice(10, 20), slice(8, 16))


def test_partial_saves_keep_revised_organs_byte_for_byte(env, tmp_path):
    client = MONAILabelClient(env["server"].url, client_id="ann-1", tmpdir=str(tmp_path))
    # Save 1 revises the liver; its pancreas and spleen are pseudo labels.
    f1, l1 = _label(env, tmp_path, "rv_b", "s1", [(LIVER, _box(2, 10)), (PANCREAS, _box(12, 18)), (SPLEEN, _box(20, 26))])
    client.save_label("rv_b", f1, tag="final", params={"revised": ["liver"]})
    assert np.array_equal(_stored(env, "rv_b"), l1)
    # Save 2 revises the pancreas, on a file whose liver (a pseudo label now) is elsewhere.
    f2, l2 = _label(env, tmp_path, "rv_b", "s2", [(LIVER, _box(28, 36)), (PANCREAS, _box(38, 44)), (STOMACH, _box(20, 26))])
    client.save_label("rv_b", f2, tag="final", params={"revised": ["pancreas"]})
    expected = l2.copy()
    expected[l2 == LIVER] = 0
    expected[l1 == LIVER] = LIVER  # revised before: exactly as saved then
    assert np.array_equal(_stored(env, "rv_b"), expected)
    organs = _organs(client, "rv_b")
    assert organs["liver"]["state"] == organs["pancreas"]["state"] == "revised"
    assert organs["stomach"]["state"] == organs["spleen"]["state"] == "pseudo"
    assert organs["liver"]["client_id"] == "ann-1" and organs["liver"]["ts"] <= organs["pancreas"]["ts"]
    # Save 3 revises the liver again: the new liver replaces the old one; the pancreas stays as revised.
    f3, l3 = _label(env, tmp_path, "rv_b", "s3", [(LIVER, _box(0, 6)), (PANCREAS, _box(6, 12))])
    client.save_label("rv_b", f3, tag="final", params={"revised": ["liver"]})
    expected = l3.copy()
    expected[l3 == PANCREAS] = 0
    expected[l2 == PANCREAS] = PANCREAS
    assert np.array_equal(_stored(env, "rv_b"), expected)
    assert [n for n, r in _organs(client, "rv_b").items() if r["state"] == "revised"] == ["liver", "pancreas"]


def test_two_clients_saving_different_organs_at_once_keep_both(env, tmp_path):
    url = env["server"].url
    fa, la = _label(env, tmp_path, "rv_c", "a", [(LIVER, _box(2, 10)), (PANCREAS, _box(12, 18))])
    fb, lb = _label(env, tmp_path, "rv_c", "b", [(LIVER, _box(20, 28)), (PANCREAS, _box(30, 36))])
    errors = []

    def save(cid, path, organ):
        try:
            MONAILabelClient(url, client_id=cid).save_label("rv_c", path, tag="final", params={"revised": [organ]})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=a) for a in (("ann-a", fa, "liver"), ("ann-b", fb, "pancreas"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = _stored(env, "rv_c")
    assert np.array_equal(stored == LIVER, la == LIVER) and np.array_equal(stored == PANCREAS, lb == PANCREAS)
    organs = _organs(MONAILabelClient(url), "rv_c")
    assert (organs["liver"]["client_id"], organs["pancreas"]["client_id"]) == ("ann-a", "ann-b")


def test_unknown_organ_names_are_refused_and_nothing_changes(env, tmp_path):
    client = MONAILabelClient(env["server"].url, tmpdir=str(tmp_path))
    before = json.dumps(client.datastore(), sort_keys=True)
    f, _ = _label(env, tmp_path, "rv_a", "bad", [(LIVER, _box(2, 10))])
    for revised in (["liver", "brain", "heart"], []):
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label("rv_a", f, tag="final", params={"revised": revised})
        assert "Status: 422;" in e.value.msg, e.value.msg
    assert "brain, heart" in str(
        pytest.raises(MONAILabelClientException, client.save_label, "rv_a", f, "final", {"revised": ["brain", "heart"]}).value.msg
    )
    assert json.dumps(client.datastore(), sort_keys=True) == before
    assert not (env["studies"] / "labels" / "final" / "rv_a.nii.gz").exists()


def test_next_sample_hands_out_the_organs_still_to_revise(env, tmp_path):
    url = env["server"].url
    client = MONAILabelClient(url, client_id="ann-1", tmpdir=str(tmp_path))
    # Whole-volume saves (no list): every organ revised, so these images leave the pool.
    for image_id in ("rv_b", "rv_c"):
        f, _ = _label(env, tmp_path, image_id, f"whole_{image_id}", [(LIVER, _box(2, 10))])
        client.save_label(image_id, f, tag="final")
        assert {r["state"] for r in _organs(client, image_id).values()} == {"revised"}
    request = Request(url + "/scoring/importance?run_sync=true", data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    urlopen(request, timeout=600).read()
    record = client.datastore()["objects"]["rv_a"]["image"]["info"]["importance"]
    attention = record["organs"]
    assert len(attention) >= 5, record  # enough organs with attention for three handouts
    first = client.next_sample("importance", {"client_id": "ann-1"})
    assert (first["id"], first["organs"], first["score"]) == ("rv_a", attention[:2], record["score"])
    f, _ = _label(env, tmp_path, "rv_a", "partial", [(LIVER, _box(2, 10))])
    client.save_label("rv_a", f, tag="final", params={"revised": attention[:2]})
    # Two annotators at once: both get the partly revised image, each other organs still to revise.
    got = {}
    threads = [
        threading.Thread(target=lambda c=c: got.__setitem__(c, MONAILabelClient(url).next_sample("importance", {"client_id": c})))
        for c in ("ann-2", "ann-3")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers = sorted(got.values(), key=lambda a: attention.index(a["organs"][0]))
    assert [a["id"] for a in answers] == ["rv_a", "rv_a"]
    assert [a["organs"] for a in answers] == [attention[2:4], attention[4:6]]
    left = sum(v for o, v in record["organ_scores"].items() if o not in attention[:2])
    assert answers[0]["score"] == int(round(left)) and answers[0]["revised"] == sorted(attention[:2])
    # /info/: what is handed out now (OHIF's Next Sample dialog shows no organs; its Info link opens this),
    # per organ, images revised and images still carrying attention.
    # (MONAILabelClient sends its own client_id, None here, over the params': the two asked anonymously.)
    handouts = {h["client"]: h for h in client.info()["suprem"]["handouts"] if h["image"] == "rv_a"}
    assert handouts["ann-1"]["organs"] == attention[:2], handouts
    assert sorted(handouts["anonymous"]["organs"]) == sorted(attention[2:6]), handouts
    assert 0 < handouts["anonymous"]["hold_left_s"] <= 1800, handouts
    progress = client.info()["suprem"]["revision"]
    assert progress[attention[0]] == {"revised": 3, "attention": 0}
    assert progress[attention[2]]["attention"] == 1 and progress[attention[2]]["revised"] == 2
    # Everything with attention revised: the image leaves the pool.
    client.save_label("rv_a", f, tag="final", params={"revised": attention})
    assert MONAILabelClient(url).next_sample("importance", {"client_id": "ann-4"}) == {}
    assert client.info()["suprem"]["revision"][attention[2]] == {"revised": 3, "attention": 0}


def _label_info(lab):
    """MONAI Label's ``label_info`` as 3D Slicer's and OHIF's Submit Label send it: the segments, no ``revised``."""
    names = {v: n for n, v in CLASS_INDEX.items()}
    return [{"name": names[int(v)], "idx": int(v)} for v in np.unique(lab) if v]


def _on_background(lab, served, value, box):
    """``value`` drawn into ``box`` where the served label has no organ: only that organ changes."""
    region = np.zeros(lab.shape, bool)
    region[box] = True
    lab[region & (served == 0)] = value
    assert (region & (served == 0)).sum() > 50


def test_a_save_naming_no_organs_revises_the_organs_handed_out_and_changed_and_revised_overrides(env, tmp_path):
    url, studies = env["server"].url, env["studies"]
    ann = MONAILabelClient(url, client_id="ann-5", tmpdir=str(tmp_path))
    write_phantom(make_phantom(63, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(tmp_path / "new"), "rv_d", None)
    # Its importance record as the scoring writes it (the scoring itself is tested above): two organs to hand out.
    record = {"score": 9, "organs": ["liver", "spleen", "aorta"], "organ_scores": {"liver": 4, "spleen": 3, "aorta": 2}}
    ann.upload_image(str(tmp_path / "new" / "rv_d.nii.gz"), "rv_d", {"importance": record})
    got = ann.next_sample("importance", {})
    handed = got["organs"]
    assert (got["id"], handed) == ("rv_d", ["liver", "spleen"]), got
    # The annotator runs the model (the pre-annotation the server keeps), fixes the handed-out organs and
    # draws one more, and saves as Slicer and OHIF do: the label and its label_info, no "revised".
    served_file, _ = ann.infer("segresnet", "rv_d", {})
    served = np.asarray(nib.load(served_file).dataobj)
    assert ann.datastore()["objects"]["rv_d"]["labels"]["original"]["info"]["client_id"] == "ann-5"
    drawn = "pancreas"
    lab1 = served.copy()
    _on_background(lab1, served, CLASS_INDEX[handed[0]], (slice(0, 12), slice(0, 12), slice(0, 8)))
    _on_background(lab1, served, CLASS_INDEX[drawn], (slice(36, 48), slice(36, 48), slice(24, 32)))
    affine = nib.load(str(studies / "rv_d.nii.gz")).affine
    f1 = str(tmp_path / "implied.nii.gz")
    nib.save(nib.Nifti1Image(lab1, affine), f1)
    ann.save_label("rv_d", f1, tag="final", params={"label_info": _label_info(lab1)})
    organs = _organs(ann, "rv_d")
    assert sorted(n for n, r in organs.items() if r["state"] == "revised") == sorted(handed + [drawn])
    assert organs[handed[1]]["client_id"] == "ann-5" and np.array_equal(_stored(env, "rv_d"), lab1)
    # An explicit "revised" overrides the hand-out and the comparison: the organs it does not name, changed
    # or not, are pseudo labels now or keep what was revised before, voxel for voxel.
    lab2 = lab1.copy()
    lab2[lab2 == CLASS_INDEX[handed[0]]] = 0  # a revised organ erased in this file: kept as stored
    _on_background(lab2, lab1, CLASS_INDEX["gall_bladder"], (slice(36, 48), slice(0, 12), slice(0, 8)))
    _on_background(lab2, lab1, CLASS_INDEX["duodenum"], (slice(0, 12), slice(36, 48), slice(24, 32)))
    f2 = str(tmp_path / "named.nii.gz")
    nib.save(nib.Nifti1Image(lab2, affine), f2)
    ann.save_label("rv_d", f2, tag="final", params={"label_info": _label_info(lab2), "revised": ["gall_bladder"]})
    organs = _organs(ann, "rv_d")
    assert sorted(n for n, r in organs.items() if r["state"] == "revised") == sorted(handed + [drawn, "gall_bladder"])
    assert organs["duodenum"]["state"] == "pseudo"
    stored = _stored(env, "rv_d")
    assert np.array_equal(stored == CLASS_INDEX[handed[0]], lab1 == CLASS_INDEX[handed[0]])
    info = ann.datastore()["objects"]["rv_d"]["labels"]["final"]["info"]
    assert "revised_from" not in info
    # A save by an annotator Next Sample handed nothing: a whole-volume revision, as before.
    MONAILabelClient(url, client_id="ann-6").save_label("rv_d", f2, tag="final", params={"label_info": _label_info(lab2)})
    assert {r["state"] for r in _organs(ann, "rv_d").values()} == {"revised"}


def test_a_restarted_server_still_knows_the_organs_it_handed_out(env, tmp_path):
    """A server that crashes between Next Sample and Submit Label: after the restart the annotator gets the
    same work back, nobody else gets those organs, and the save naming no organs counts them as revised."""
    studies, new = tmp_path / "studies", tmp_path / "new"
    write_phantom(make_phantom(70, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(new), "rs_a", None)
    write_phantom(make_phantom(71, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), "rs_b", None)
    conf = dict(env["server"].conf, model_dir=str(tmp_path / "model"))
    record = {"score": 9, "organs": ["liver", "spleen", "aorta"], "organ_scores": {"liver": 4, "spleen": 3, "aorta": 2}}
    srv = Server(str(studies), conf, str(tmp_path), env={"MONAI_LABEL_TASKS_TRAIN": "false"}).wait_ready()
    try:
        ann = MONAILabelClient(srv.url, client_id="ann-r", tmpdir=str(tmp_path))
        ann.upload_image(str(new / "rs_a.nii.gz"), "rs_a", {"importance": record})
        got = ann.next_sample("importance", {})
        assert (got["id"], got["organs"]) == ("rs_a", ["liver", "spleen"]), got
        served_file, _ = ann.infer("segresnet", "rs_a", {})
    finally:
        srv.kill()  # a crash: nothing is written at exit
    srv = Server(str(studies), conf, str(tmp_path), env={"MONAI_LABEL_TASKS_TRAIN": "false"}).wait_ready()
    try:
        other = MONAILabelClient(srv.url, client_id="ann-s").next_sample("importance", {})
        assert (other["id"], other.get("organs")) == ("rs_a", ["aorta"]), "only the organs nobody holds"
        ann = MONAILabelClient(srv.url, client_id="ann-r", tmpdir=str(tmp_path))
        served = np.asarray(nib.load(served_file).dataobj)
        ann.save_label("rs_a", served_file, tag="final", params={"label_info": _label_info(served)})
        organs = ann.datastore()["objects"]["rs_a"]["labels"]["final"]["info"]["organs"]
        assert sorted(n for n, r in organs.items() if r["state"] == "revised") == ["liver", "spleen"]
        assert ann.next_sample("importance", {})["id"] == "rs_b", "done: new work"
    finally:
        srv.stop()
