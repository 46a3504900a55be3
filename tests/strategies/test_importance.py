"""Next Sample (strategy ``importance``) on a real checked datastore: asking again gives the same work to
the annotator who holds it, until that work is done; others are kept off it."""

from __future__ import annotations


from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.datastore import CheckedLocalDatastore
from lib.importance.records import INFO_KEY
from lib.strategies.importance import ImportanceStrategy
from support import tiny_studies

ORGANS = ["liver", "pancreas", "spleen", "stomach"]


def _datastore(tmp_path, n=3):
    studies, label = tiny_studies(tmp_path, n)
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], allowed_labels=[CLASS_INDEX[n] for n in LABEL_SETS["atlas25"]])
    return ds, label


def _score(ds, image_id, score):
    terms = {o: score / len(ORGANS) for o in ORGANS}
    ds.update_image_info(image_id, {INFO_KEY: {"score": score, "organs": ORGANS, "organ_scores": terms, "models": {}}})


def test_whole_image_holds_asking_again_gives_the_same_image_until_a_label_is_saved(tmp_path):
    ds, label = _datastore(tmp_path)
    for i, score in enumerate((30, 20, 10)):
        _score(ds, f"im{i}", score)
    ask = ImportanceStrategy(hold_s=600)
    first = ask({"client_id": "a-1"}, ds)
    assert first["id"] == "im0" and ask({"client_id": "a-1"}, ds)["id"] == "im0"
    assert ask({"client_id": "a-2"}, ds)["id"] == "im1"
    # Unidentified requests (none sent, Slicer's default) cannot be told apart: each gets new work.
    assert ask({"client_id": "user-xyz"}, ds)["id"] == "im2"
    assert ask({}, ds) == {}, "everything is held"
    ds.save_label("im0", label, "final", {"revised": ["liver"], "client_id": "a-1"})
    again = ask({"client_id": "a-1"}, ds)
    assert again["id"] == "im0" and again["organs"] == ORGANS[1:], "a new hand-out: the organs still unrevised"


def test_an_unscored_hand_out_comes_back_with_its_organs_once_scored_and_organ_holds_end_when_revised(tmp_path):
    ds, label = _datastore(tmp_path, n=1)
    ask = ImportanceStrategy(hold_s=600, organs_per_sample=2)
    assert ask({"client_id": "a-7"}, ds) == {"id": "im0", "scored": False}
    assert ask({"client_id": "a-8"}, ds) == {}, "held whole while unscored"
    _score(ds, "im0", 40)
    got = ask({"client_id": "a-7"}, ds)
    assert (got["id"], got["organs"], got["score"]) == ("im0", ORGANS[:2], 40)
    assert ask({"client_id": "a-8"}, ds)["organs"] == ORGANS[2:]
    assert ask({"client_id": "a-7"}, ds)["organs"] == ORGANS[:2]
    ds.save_label("im0", label, "final", {"revised": ORGANS[:1], "client_id": "a-7"})
    assert ask({"client_id": "a-7"}, ds)["organs"] == ORGANS[1:2], "the held organ still to revise"
    ds.save_label("im0", label, "final", {"revised": ORGANS[1:2], "client_id": "a-7"})
    assert ask({"client_id": "a-7"}, ds) == {}, "done; the other organs are with a-8"


def test_the_organs_handed_out_are_known_for_their_holder_only_and_only_within_the_hold(tmp_path):
    ds, _ = _datastore(tmp_path, n=2)
    _score(ds, "im0", 40)
    ask = ImportanceStrategy(hold_s=600, organs_per_sample=2)
    assert ask({"client_id": "a-7"}, ds)["organs"] == ORGANS[:2]
    assert ask.organs_handed_to("a-7", "im0") == ORGANS[:2]
    assert ask.organs_handed_to("a-8", "im0") is None and ask.organs_handed_to("a-7", "im1") is None
    assert ask.organs_handed_to(None, "im0") is None and ask.organs_handed_to("user-xyz", "im0") is None
    # A datastore that counts hand-outs to requests that say nobody (DICOMweb: OHIF sends no client id).
    assert ask.organs_handed_to(None, "im0", anonymous=True) is None, "a-7's organs are not anonymous ones"
    assert ask({}, ds)["organs"] == ORGANS[2:4]
    assert ask.organs_handed_to(None, "im0", anonymous=True) == ORGANS[2:4]
    assert ask.organs_handed_to("user-xyz", "im0", anonymous=True) == ORGANS[2:4], "Slicer's default id: nobody"
    assert ask.organs_handed_to(None, "im0") is None, "not counted where the datastore does not say so"
    whole = ImportanceStrategy(hold_s=600)  # K = 0: the whole image is handed out, not some organs
    assert whole({"client_id": "a-7"}, ds)["id"] == "im0" and whole.organs_handed_to("a-7", "im0") is None
    ask.hold_s = 0.0  # the hold has run out
    assert ask.organs_handed_to("a-7", "im0") is None
