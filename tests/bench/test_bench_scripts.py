"""Every bench script runs end to end on a tiny input (seconds, CPU), through its own ``main``, as
``python -m bench.<script>`` would; bench_gpu and bench_infer have their own smoke tests."""

from __future__ import annotations

import json
import re

import pytest


def test_bench_train_times_an_iteration_with_the_train_tasks_loss_and_runs_a_round(capsys):
    from bench.bench_train import main

    args = ["--backbones", "segresnet", "--roi", "16", "--fallback-roi", "0", "--iters", "1", "--budget-s", "120"]
    assert main(args + ["--round-preset", "demo", "--round-epochs", "1", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    # One timed fp32 and one bf16 iteration of SegResNet at 16^3, each with its seconds.
    assert re.search(r"\| segresnet \| 16\^3 x2 \| fp32 \| \d+\.\d\d \| 1 \|", out), out
    assert re.search(r"\| segresnet \| 16\^3 x2 \| bf16 autocast \| \d+\.\d\d \| 1 \|", out), out
    assert "Round status: done (started), labels used 4, rescored 4, failed 0." in out, out


def test_bench_attention_matches_the_reference_on_a_small_grid(capsys):
    from bench.bench_attention import main

    main(["--shape", "24", "24", "16", "--organs", "3", "--models", "2", "--ref-organs", "2", "--threads", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| compact", "| scattered"))]
    assert len(rows) == 4, rows  # per layout: the reference's 2 organs compared, all 3 organs timed
    compared = [r for r in rows if "not compared" not in r]
    assert len(compared) == 2 and all("maps identical" in r and "score equal" in r for r in compared), compared


def test_cpu_batch_prints_a_row_per_window_and_pass(capsys):
    from bench.cpu_batch import main

    assert main(["--threads", "2", "--repeats", "1", "--shapes", "8x8x8", "--batches", "1,2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| 8x8x8 \| train step \| \d+\.\d+ s \| \d+\.\d+ s \| \d+\.\d+x \|", out), out
    assert re.search(r"\| 8x8x8 \| inference \| \d+\.\d+ s \| \d+\.\d+ s \| \d+\.\d+x \|", out), out


def test_bench_scale_cost_model_counts_flops_of_each_backbone(capsys):
    from bench.bench_scale import main

    assert main(["cost", "--device", "cpu", "--window", "32", "--grid", "48x48x48", "--backbones", "segresnet"]) == 0
    out = capsys.readouterr().out
    for backbone in ("segresnet",):
        flops = re.search(rf"\| {backbone} \| (\d+\.\d+) \| \d+\.\d\d \|", out)
        assert flops and float(flops.group(1)) > 0, out
    assert re.search(r"\| recipe \| 1000 \| ", out) and re.search(r"\| fast \| 9262 \| ", out), out


def test_bench_scale_engines_scores_a_folder_in_process_and_times_the_cache(capsys):
    from bench.bench_scale import main

    args = ["engines", "--volumes", "2", "--workers", "0", "--shape", "32x32x24", "--cache-shape", "48x48x40"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"\| in-process \((before|after)\) \| \d+ torch threads \| 2 \|", out)) == 2, out
    assert re.search(r"\d+\.\d\d s read back from it \(round 2\)", out), out


@pytest.mark.server
def test_bench_load_serves_next_sample_and_save_label_to_concurrent_clients(tmp_path):
    from bench.bench_load import main

    args = ["--images", "6", "--clients", "2", "--requests", "1", "--saves", "1", "--monailabel-env", "tests"]
    assert main(args + ["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results-tests.json").read_text())
    phases = {p["phase"]: (p["requests"], p["errors"]) for p in result["phases"]}
    assert phases == {"next-sample importance": (2, 0), "next-sample random": (2, 0), "save-label": (2, 0)}, result
    assert result["labels_saved_and_listed"] == "2/2"
