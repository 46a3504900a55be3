"""Offline ranking of a study folder: CSV by descending score, resumable, bad studies recorded."""

from __future__ import annotations

import csv
import os

from lib.data.phantoms import make_phantom, write_phantom
from lib.importance.rank import main
from lib.weights import RELEASED_FILES
from support import write_synthetic_checkpoint


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rank_writes_a_priority_csv_and_a_rerun_scores_only_what_changed(tmp_path, caplog):
    studies = tmp_path / "studies"
    for i in range(3):
        write_phantom(make_phantom(80 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), f"v{i}", None)
    (studies / "bad.nii.gz").write_bytes(b"garbage")
    w = tmp_path / "w"
    write_synthetic_checkpoint("segresnet", str(w / RELEASED_FILES["segresnet"]))
    out = str(tmp_path / "ranking.csv")
    args = [str(studies), "--out", out, "--models", "segresnet", "--weights-dir", str(w),
            "--model-dir", str(tmp_path / "m"), "--overlap", "0", "--no-progress"]
    assert main(args) == 0
    rows = _read(out)
    assert [r["id"] for r in rows][-1] == "bad" and "could not read" in rows[-1]["error"]
    scores = [float(r["score"]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert all(r["organs_by_priority"] for r in rows[:3] if float(r["score"]) > 0)
    parts = os.listdir(out + ".parts")
    assert sorted(parts) == ["bad.json", "v0.json", "v1.json", "v2.json"]

    # Interrupted run: one record lost; a changed study: both redone, nothing else.
    os.remove(os.path.join(out + ".parts", "v1.json"))
    write_phantom(make_phantom(99, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), "v2", None)
    caplog.clear()
    with caplog.at_level("INFO", logger="lib.importance.rank"):
        assert main(args) == 0
    assert any("4 studies, 2 already scored, 2 to score" in r.getMessage() for r in caplog.records)
    assert len(_read(out)) == 4
