"""Next Sample (strategy ``importance``) on a real checked datastore: asking again gives the same work to
the annotator who holds it, until that work is done; others are kept off it."""

from __future__ import annotations

import logging

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


def test_a_restarted_strategy_keeps_who_holds_what_from_its_state_file(tmp_path, caplog):
    ds, label = _datastore(tmp_path, n=3)
    for i, score in enumerate((30, 20, 10)):
        _score(ds, f"im{i}", score)
    state = str(tmp_path / "state" / "handouts.json")
    before = ImportanceStrategy(hold_s=600, organs_per_sample=2, state_file=state)
    assert before({"client_id": "a-7"}, ds)["organs"] == ORGANS[:2]
    assert before({"client_id": "a-8"}, ds)["organs"] == ORGANS[2:4]
    whole = ImportanceStrategy(hold_s=600, state_file=str(tmp_path / "whole.json"))
    assert whole({"client_id": "a-9"}, ds)["id"] == "im0"
    # The server restarts: new strategies read the files.
    after = ImportanceStrategy(hold_s=600, organs_per_sample=2, state_file=state)
    assert after.organs_handed_to("a-7", "im0") == ORGANS[:2] and after.organs_handed_to("a-8", "im0") == ORGANS[2:4]
    assert after({"client_id": "a-7"}, ds)["organs"] == ORGANS[:2], "the same work back"
    assert after({"client_id": "a-6"}, ds)["id"] == "im1", "im0's organs are all held"
    whole_after = ImportanceStrategy(hold_s=600, state_file=str(tmp_path / "whole.json"))
    assert whole_after({"client_id": "a-1"}, ds)["id"] == "im1", "im0 is held whole by a-9"
    assert whole_after({"client_id": "a-9"}, ds)["id"] == "im0"
    ds.save_label("im0", label, "final", {"revised": ORGANS[:2], "client_id": "a-7"})
    got = after({"client_id": "a-7"}, ds)
    assert (got["id"], got["organs"]) == ("im1", ORGANS[2:4]), "a-7's work is done: new work, beside a-6's"
    assert ImportanceStrategy(hold_s=600, organs_per_sample=2, state_file=state).organs_handed_to("a-7", "im0") is None
    # Holds that ran out while the server was down are not kept; a file that cannot be read holds nothing.
    assert ImportanceStrategy(hold_s=0.0, organs_per_sample=2, state_file=state).organs_handed_to("a-8", "im0") is None
    with open(state, "w") as f:
        f.write('{"im0": {"liver": {"client": "a-7"}}, "im1": ')
    with caplog.at_level(logging.WARNING, logger="lib.strategies.importance"):
        got = ImportanceStrategy(hold_s=600, organs_per_sample=2, state_file=state)({"client_id": "a-5"}, ds)
    assert f"{state} cannot be read" in caplog.text
    assert (got["id"], got["organs"]) == ("im1", ORGANS[:2]), "a-6's hold on them is forgotten"
    with open(state, "w") as f:
        f.write('{"im0": {"liver": {"client": "a-7"}}, "im1": {"spleen": {"client": "a-8", "since": 1e12, "revised": null}}}')
    with caplog.at_level(logging.WARNING, logger="lib.strategies.importance"):
        mixed = ImportanceStrategy(hold_s=600, organs_per_sample=2, state_file=state)
    assert "the hand-out of im0 cannot be read" in caplog.text
    assert mixed.organs_handed_to("a-7", "im0") is None and mixed.organs_handed_to("a-8", "im1") == ["spleen"]
