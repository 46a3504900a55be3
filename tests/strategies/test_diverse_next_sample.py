"""Next Sample with ``diversity_temperature``: annotators asking at the same time get a stratified,
noise-diversified batch, not the top of one sorted list; off, the highest score first as before."""

from __future__ import annotations

from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.datastore import CheckedLocalDatastore
from lib.importance.records import INFO_KEY
from lib.strategies.importance import ImportanceStrategy
from support import tiny_studies

# im0-im2: one kind of volume (the liver's term is large); im3-im5: smaller scores on other organs.
RECORDS = {
    "im0": {"liver": 90.0}, "im1": {"liver": 85.0}, "im2": {"liver": 80.0},
    "im3": {"pancreas": 30.0}, "im4": {"kidney_left": 20.0}, "im5": {"aorta": 10.0},
}


def _pool(tmp_path):
    studies, _ = tiny_studies(tmp_path, len(RECORDS))
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], allowed_labels=[CLASS_INDEX[n] for n in LABEL_SETS["atlas25"]])
    for image_id, terms in RECORDS.items():
        ds.update_image_info(image_id, {INFO_KEY: {"score": sum(terms.values()), "organs": list(terms),
                                                   "organ_scores": terms, "models": {}}})
    return ds


def _batch(strategy, ds, n=3):
    return [strategy({"client_id": f"annotator-{k}"}, ds)["id"] for k in range(n)]


def test_off_three_annotators_get_the_top_three_of_one_sorted_list(tmp_path):
    assert _batch(ImportanceStrategy(hold_s=600), _pool(tmp_path)) == ["im0", "im1", "im2"]


def test_on_three_annotators_get_a_stratified_batch_the_same_for_the_same_round(tmp_path):
    ds = _pool(tmp_path)
    batches = []
    for seed in range(4):
        batch = _batch(ImportanceStrategy(hold_s=600, diversity_temperature=0.5, seed=seed), ds)
        assert len(set(batch)) == 3
        assert sum(i in ("im0", "im1", "im2") for i in batch) <= 1, batch  # one stratum (the liver), one place
        batches.append(batch)
    again = _batch(ImportanceStrategy(hold_s=600, diversity_temperature=0.5, seed=0), ds)
    assert again == batches[0], "one round's batch does not depend on when each annotator asks"
    # Asking again gives the annotator the same image.
    strategy = ImportanceStrategy(hold_s=600, diversity_temperature=50.0, diversity_decay=0.0, round_of=lambda: 0)
    first = strategy({"client_id": "a"}, ds)["id"]
    assert strategy({"client_id": "a"}, ds)["id"] == first
    # Round 1: T = 50 * 0 ** 1 = 0, the stratified top without noise: each organ's best volume, so never
    # the liver's second or third.
    late = ImportanceStrategy(hold_s=600, diversity_temperature=50.0, diversity_decay=0.0, round_of=lambda: 1)
    batch = _batch(late, ds)
    assert len(set(batch)) == 3 and not {"im1", "im2"} & set(batch), batch


def test_the_servers_round_index_counts_the_rounds_done_in_its_log(tmp_path):
    import json

    from lib.app import rounds_done

    count = rounds_done(str(tmp_path))
    assert count() == 0, "no round log yet: round 0"
    (tmp_path / "rounds").mkdir()
    entries = [{"round": 1, "status": "done"}, {"round": 2, "status": "failed"}, {"round": 3, "status": "done"},
               {"round": 4, "status": "running"}]
    (tmp_path / "rounds" / "rounds.json").write_text(json.dumps(entries))
    assert count() == 2
