"""bench_gpu and bench_infer run end to end on tiny inputs on the CPU, through their own ``main``, as
``python -m bench.<script>`` would (they are measured on a GPU; here only that they run and report)."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np

from support import shared_path


def test_bench_gpu_smoke_times_scoring_infer_and_a_whole_round(tmp_path, capsys):
    from bench.bench_gpu import main

    shared_path("data", "totalseg-example", "ct.nii.gz")
    out = tmp_path / "bench_gpu.md"
    args = ["--smoke", "--presets", "fast", "--volumes", "1", "--round", "--round-labelled", "2",
            "--round-unlabelled", "1", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    report = out.read_text()
    assert report == capsys.readouterr().out.strip() + "\n"
    assert re.search(r"\| fast \| scoring \| \d+\.\d\d \|", report), report
    assert re.search(r"\| fast \| infer \| \d+\.\d\d \|.*\| \*\*\d+\.\d\d\*\* \|", report), report
    # The round ran the server's own round (train, publish, re-score) and was projected.
    assert "- round (done)" in report and "1 training + 1 validation copies x 1 epochs" in report, report
    assert re.search(r"projected round for 400 revised volumes .* \d+\.\d\d h \(training", report), report
    assert len(re.findall(r"^- (MET|NOT MET): .*\(smoke run: not a measurement\)$", report, re.M)) == 4, report


def test_bench_infer_measures_a_small_input_through_the_infer_task(tmp_path, capsys):
    from bench.bench_infer import main

    small = tmp_path / "small.nii.gz"
    ct = nib.load(shared_path("data", "totalseg-example", "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[40:72, 30:62, :], ct.affine), str(small))
    main(["--backbones", "segresnet", "--presets", "recipe", "--inputs", str(small), "--repeat", "1",
          "--window-passes", "1", "--max-seconds", "120", "--total-seconds", "120"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| small.nii.gz") or "segresnet | recipe" in r]
    measured = [r for r in rows if "segresnet | recipe" in r]
    assert measured and "projected" not in measured[0], rows  # a full run through the infer task, not a projection
