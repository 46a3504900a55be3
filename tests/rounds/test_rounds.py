"""Rounds: triggers, queueing, exclusion across threads and processes, the log, restarts, the CLI.

No server and no training: ``run_round`` is ``fake_rounds.Recorder`` (sleeps, records when it ran).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lib.rounds import RoundError, RoundLog, RoundManager, mean_dice
from lib.rounds.lock import FileLock, acquire_runner, is_locked

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from fake_rounds import Recorder, read_records  # noqa: E402


def wait_for(cond, timeout=20.0, step=0.02):
    """Poll ``cond()`` until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def assert_no_overlap(records):
    """Recorded rounds (sorted by start) never run at the same time."""
    for a, b in zip(records, records[1:]):
        assert a["end"] <= b["start"], f"rounds {a['round']} and {b['round']} overlap"


def make(tmp_path, sleep=0.0, labels=("a", "b"), **kw):
    record = str(tmp_path / "record.jsonl")
    rec = Recorder(record, sleep=sleep, fail_rounds=kw.pop("fail_rounds", ()))
    label_list = list(labels)
    m = RoundManager(str(tmp_path / "state"), rec, list_labels=lambda: list(label_list), **kw)
    return m, rec, label_list


def py_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- queueing and exclusion ------------------------------------------------------------------------------
def test_five_triggers_during_a_round_make_exactly_one_more_round(tmp_path):
    m, rec, _ = make(tmp_path, sleep=0.6)
    assert m.trigger("demand") == "started"
    wait_for(lambda: m.log.current() is not None)  # the round has begun its work
    answers = [m.trigger("labels") for _ in range(5)]
    assert answers == ["queued"] + ["already queued"] * 4
    assert m.join(20)
    entries = m.log.entries()
    assert [e["round"] for e in entries] == [1, 2]
    assert [e["status"] for e in entries] == ["done", "done"]
    # The extra round says which trigger queued it.
    assert [e["trigger"] for e in entries] == ["demand", "labels"]
    assert_no_overlap(read_records(rec.record))
    assert not m.busy() and not os.path.exists(m.pending_path)


def test_concurrent_triggers_from_many_threads_never_overlap_and_none_is_lost(tmp_path):
    m, rec, _ = make(tmp_path, sleep=0.05)
    last_trigger = []
    stop = time.monotonic() + 2.0

    def hammer():
        while time.monotonic() < stop:
            t = time.time()
            m.trigger("thread")
            last_trigger.append(t)
            time.sleep(0.01)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.join(20)
    records = read_records(rec.record)
    assert len(records) >= 2
    assert_no_overlap(records)
    # Every trigger is covered: the last round started after the last trigger was made.
    assert records[-1]["start"] >= max(last_trigger)
    entries = m.log.entries()
    assert [e["round"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["status"] == "done" for e in entries)
    assert len(entries) == len(records)


def test_rounds_never_overlap_across_two_processes(tmp_path):
    m, rec, _ = make(tmp_path, sleep=0.25)
    other = subprocess.Popen(
        [sys.executable, str(HERE / "fake_rounds.py"), "run", m.state_dir, rec.record,
         "--sleep", "0.25", "--triggers", "4", "--gap", "0.05"],
        env=py_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Let the other process get the first round, then trigger from here while it runs its rounds.
    wait_for(lambda: m.busy() or other.poll() is not None)
    answers = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and other.poll() is None:
        answers.append(m.trigger("this-process"))
        time.sleep(0.07)
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err
    assert m.join(30)
    assert not m.busy()  # the other process ran every round it queued or was queued before exiting
    # With the other process gone this one certainly runs a round itself.
    assert m.trigger("this-process", wait=True) == "started"
    records = read_records(rec.record)
    assert {r["pid"] for r in records} == {os.getpid(), other.pid}, (out, answers)
    assert_no_overlap(records)
    entries = m.log.entries()
    assert [e["round"] for e in entries] == list(range(1, len(records) + 1))
    assert all(e["status"] == "done" for e in entries)


# --- label count trigger ---------------------------------------------------------------------------------
def test_label_saved_triggers_a_round_after_every_labels_distinct_new_labels(tmp_path):
    m, rec, labels = make(tmp_path, every_labels=3)
    assert m.label_saved("a") is None
    assert m.label_saved("b") is None
    assert m.label_saved("a") is None  # saving an image again is not a new label
    labels.append("c")
    assert m.label_saved("c") == "started"
    assert m.join(10)
    (entry,) = m.log.entries()
    assert entry["trigger"] == "labels" and entry["labels_used"] == 3 and entry["label_ids"] == ["a", "b", "c"]
    assert m.labels_since_round() == []  # the round covered them


def test_label_counter_survives_recreating_the_manager(tmp_path):
    m, rec, labels = make(tmp_path, every_labels=3)
    m.label_saved("a")
    m.label_saved("b")
    again = RoundManager(m.state_dir, rec, every_labels=3, list_labels=lambda: ["a", "b", "c"]).start()
    assert again.labels_since_round() == ["a", "b"]
    assert again.label_saved("c") == "started"
    assert again.join(10)
    assert len(again.log.entries()) == 1


def test_labels_saved_during_a_round_count_towards_the_next_round(tmp_path):
    m, rec, labels = make(tmp_path, sleep=0.5, every_labels=5)
    m.label_saved("a")
    assert m.trigger("demand") == "started"
    wait_for(lambda: m.log.current() is not None)  # the round has begun its work
    m.label_saved("late")
    assert m.join(10)
    # "a" was counted before the round started; "late" arrived during it and is still new.
    assert m.labels_since_round() == ["late"]


def test_trigger_without_final_labels_is_skipped_and_not_logged(tmp_path):
    m, rec, _ = make(tmp_path, labels=())
    assert m.trigger("demand") == "skipped"
    assert m.trigger("demand", wait=True) == "skipped"
    assert m.log.entries() == []
    assert read_records(rec.record) == []


# --- interval trigger ------------------------------------------------------------------------------------
def test_interval_runs_a_round_only_when_final_labels_changed(tmp_path):
    m, rec, labels = make(tmp_path, interval_s=0.15)
    m.start()
    try:
        wait_for(lambda: len(m.log.entries()) == 1 and not m.busy())
        time.sleep(0.6)  # several intervals with the same labels: nothing to learn, no round
        assert len(m.log.entries()) == 1
        labels.append("c")
        wait_for(lambda: len(m.log.entries()) == 2 and not m.busy())
        assert [e["trigger"] for e in m.log.entries()] == ["interval", "interval"]
        assert m.log.entries()[1]["label_ids"] == ["a", "b", "c"]
    finally:
        m.stop()
        m.join(10)


# --- failures and restarts ---------------------------------------------------------------------------------
def test_failing_round_is_logged_failed_with_its_message_and_the_next_round_runs(tmp_path):
    m, rec, _ = make(tmp_path, fail_rounds={1})
    assert m.trigger("demand", wait=True) == "started"
    assert m.trigger("demand", wait=True) == "started"
    first, second = m.log.entries()
    assert first["status"] == "failed" and first["error"] == "RuntimeError: out of memory in round 1"
    assert "mean_dice" not in first
    assert second["status"] == "done" and second["round"] == 2
    assert m.info()["last"]["round"] == 2


def test_round_error_records_what_the_round_did_before_failing(tmp_path):
    def run_round(entry):
        raise RoundError("swinunetr diverged", {"published": {"unet": {"file": "u.pth", "version": "abc"}}})

    m = RoundManager(str(tmp_path), run_round, list_labels=lambda: ["a"])
    m.trigger("demand", wait=True)
    (e,) = m.log.entries()
    assert e["status"] == "failed" and e["error"] == "swinunetr diverged"
    assert e["published"]["unet"]["version"] == "abc"


def start_hanging_round(state_dir):
    """A second process that starts a round and sleeps in it; returns it once its entry is running."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fake_rounds.py"), "hang", state_dir],
        env=py_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    log = RoundLog(os.path.join(state_dir, "rounds.json"))
    try:
        wait_for(lambda: log.current() is not None)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1].decode())
    return proc, log


def test_round_of_a_killed_process_is_marked_interrupted_and_the_next_round_starts_cleanly(tmp_path):
    state = str(tmp_path / "state")
    proc, log = start_hanging_round(state)
    assert log.current()["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # Before the restart the dead round is no longer reported as current (its lock went with it).
    assert log.current() is None and log.entries()[0]["status"] == "running"
    m, rec, _ = make(tmp_path)
    m.start()
    (dead,) = m.log.entries()
    assert dead["status"] == "interrupted" and str(proc.pid) in dead["error"]
    assert m.trigger("demand", wait=True) == "started"
    dead, new = m.log.entries()
    assert new["round"] == 2 and new["status"] == "done" and dead["status"] == "interrupted"


def test_sigterm_to_a_process_running_a_round_logs_it_interrupted_and_ends_the_process(tmp_path):
    proc, log = start_hanging_round(str(tmp_path / "state"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 128 + signal.SIGTERM, proc.communicate()[1].decode()
    (cut,) = log.entries()
    assert cut["status"] == "interrupted" and "SIGTERM" in cut["error"], cut
    assert log.current() is None and not is_locked(log.round_lock)


def test_start_runs_an_interrupted_round_again_only_while_its_labels_are_still_new(tmp_path):
    state = str(tmp_path / "state")
    proc, _ = start_hanging_round(state)  # final labels a, b
    proc.kill()
    proc.wait(10)
    m, rec, _ = make(tmp_path, requeue_interrupted=True)  # final labels a, b: not trained on yet
    m.start()
    assert m.join(20)
    cut, again = m.log.entries()
    assert cut["status"] == "interrupted"
    assert again["status"] == "done" and again["trigger"] == "resumed round 1" and again["label_ids"] == ["a", "b"]
    # Cut again, but round 2 trained on the same labels: nothing new, the start runs no round.
    proc, _ = start_hanging_round(state)
    proc.kill()
    proc.wait(10)
    m, rec, _ = make(tmp_path, requeue_interrupted=True)
    m.start()
    assert m.join(20)
    assert [e["status"] for e in m.log.entries()] == ["interrupted", "done", "interrupted"]


def test_rounds_switched_off_run_no_round_yet_count_labels_and_keep_the_log(tmp_path):
    m, rec, _ = make(tmp_path)
    cut = m.log.start("labels", ["a", "b"])["round"]
    m.log.interrupt(cut, "the server was killed")  # its labels are new: a start with rounds on runs it again
    off = "training is switched off"
    m, rec, _ = make(tmp_path, every_labels=1, interval_s=0.05, requeue_interrupted=True, off=off)
    m.start()
    assert m.label_saved("a") is None  # one new label, every_labels 1
    assert m.trigger("demand") == "skipped"
    time.sleep(0.3)  # several intervals
    assert m.join(5)
    m.stop()
    assert [e["status"] for e in m.log.entries()] == ["interrupted"]
    assert read_records(rec.record) == []
    assert m.labels_since_round() == ["a"] and m.info()["off"] == off


def test_start_leaves_a_round_running_in_another_live_process_alone(tmp_path):
    state = str(tmp_path / "state")
    proc, log = start_hanging_round(state)
    try:
        m, rec, _ = make(tmp_path)
        m.start()  # e.g. MONAI Label's train subprocess starting while the server runs a round
        assert m.log.entries()[0]["status"] == "running"
        assert m.busy() and m.info()["current"]["round"] == 1
        assert m.trigger("demand") == "queued"
    finally:
        proc.kill()
        proc.wait(10)


# --- the log -------------------------------------------------------------------------------------------------
def test_log_file_always_parses_as_json_while_rounds_are_written(tmp_path):
    m, rec, _ = make(tmp_path)
    path = m.log.path
    reads, errors, done = [0], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                with open(path) as f:
                    data = json.load(f)
                assert isinstance(data, list)
                reads[0] += 1
            except FileNotFoundError:
                pass
            except Exception as e:  # a half-written file would land here
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(25):
            m.trigger("demand", wait=True)
    finally:
        done.set()
        t.join()
    assert errors == []
    assert reads[0] > 25
    assert len(m.log.entries()) == 25
    assert not [f for f in os.listdir(m.state_dir) if f.startswith(".tmp-")]  # no temporary left behind


def test_unreadable_log_is_kept_aside_and_a_new_log_started(tmp_path):
    log = RoundLog(str(tmp_path / "rounds.json"))
    (tmp_path / "rounds.json").write_text("[{\"round\": 1,")
    assert log.entries() == []
    assert log.start("demand", ["a"])["round"] == 1
    assert [p.name for p in tmp_path.glob("rounds.json.corrupt-*")]


def test_info_shows_the_current_round_then_the_last_rounds_summary(tmp_path):
    m, rec, _ = make(tmp_path, sleep=0.5)
    assert m.info() == {**m.info(), "current": None, "last": None, "rounds": 0, "busy": False}
    m.trigger("demand")
    wait_for(lambda: m.info()["current"] is not None)
    info = m.info()
    assert info["busy"] and info["current"]["round"] == 1 and info["current"]["status"] == "running"
    assert m.join(10)
    info = m.info()
    assert info["current"] is None and info["rounds"] == 1
    last = info["last"]
    assert last["status"] == "done" and "label_ids" not in last  # the id list stays out of /info/
    assert last["mean_dice"] == {"unet": 0.46, "segresnet": 0.55}
    assert last["rescored"] == 11 and last["top"][0] == {"id": "img_01", "score": 0.9}
    assert last["published"]["unet"]["version"] == "v1"
    json.dumps(info)  # /info/ must be JSON


def test_mean_dice_ignores_missing_and_nan_organs():
    assert mean_dice({"unet": {"liver": 0.9, "spleen": 0.7, "pancreas": None, "kidney": float("nan")}}) == {"unet": 0.8}
    assert mean_dice({"unet": {}}) == {"unet": None}


def test_shared_lookers_do_not_pass_for_a_running_round(tmp_path):
    path = str(tmp_path / "round.lock")
    looker = FileLock(path)
    assert looker.acquire(blocking=False, shared=True)
    assert not is_locked(path)  # a shared holder is not a round
    runner = FileLock(path)
    threading.Timer(0.1, looker.release).start()
    assert acquire_runner(runner)  # waits out the looker instead of reporting "busy"
    assert is_locked(path) and not acquire_runner(FileLock(path))
    runner.release()


# --- command line --------------------------------------------------------------------------------------------
def test_history_cli_prints_a_table_and_writes_a_png(tmp_path):
    m, rec, _ = make(tmp_path, fail_rounds={2})
    for _ in range(3):
        m.trigger("demand", wait=True)
    png = tmp_path / "dice.png"
    res = subprocess.run(
        [sys.executable, "-m", "lib.rounds", "history", m.state_dir, "--png", str(png)],
        cwd=str(ROOT), env=py_env(), capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["round", "status"])
    columns = ("status", "trigger", "started", "seconds", "labels", "dice unet", "dice segresnet", "rescored", "top")
    for column in columns:
        assert column in header
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 3
    assert "done" in rows[0] and "0.460" in rows[0] and "img_01 (0.900)" in rows[0]
    assert "failed" in rows[1] and "out of memory" in rows[1]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("plotter", ["matplotlib", "pil"])
def test_dice_plot_is_a_png_with_either_plotter(tmp_path, plotter):
    if plotter == "matplotlib":
        pytest.importorskip("matplotlib")
    from lib.rounds.__main__ import main

    m, rec, _ = make(tmp_path)
    for _ in range(3):
        m.trigger("demand", wait=True)
    png = tmp_path / f"{plotter}.png"
    assert main(["history", m.state_dir, "--png", str(png), "--plotter", plotter]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 3000
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] >= 600 and len(im.convert("RGB").getcolors(1 << 20)) > 3  # not a blank image


def test_history_of_an_empty_state_dir_says_so_and_still_plots(tmp_path, capsys):
    from lib.rounds.__main__ import main

    png = tmp_path / "empty.png"
    assert main(["history", str(tmp_path), "--png", str(png)]) == 0
    assert "(no rounds yet)" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_start_command_asks_the_server_for_the_round_train_task(monkeypatch, capsys):
    from monailabel.client import MONAILabelClient

    from lib.rounds.__main__ import main

    calls = []

    def fake_train_start(self, model, params):
        calls.append((self._server_url, model, params))
        return {"id": "job-1", "status": "SUBMITTED"}

    monkeypatch.setattr(MONAILabelClient, "train_start", fake_train_start)
    assert main(["start", "--server", "http://127.0.0.1:8123/"]) == 0
    assert calls == [("http://127.0.0.1:8123", "round", {})]
    assert "job-1" in capsys.readouterr().out


def test_history_prints_and_plots_the_organs_revised_per_round(tmp_path, capsys):
    from lib.files import write_json_atomic
    from lib.rounds.__main__ import main

    entries = [
        {"round": 1, "status": "done", "mean_dice": {"unet": 0.4}, "revised_images": {"liver": 2, "pancreas": 0}},
        {"round": 2, "status": "done", "mean_dice": {"unet": 0.5}, "revised_images": {"liver": 3, "pancreas": 2}},
    ]
    write_json_atomic(tmp_path / "rounds.json", entries)
    png = tmp_path / "dice.png"
    assert main(["history", str(tmp_path), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    rows = [line.split(None, 3) for line in out.split("organs revised per round:")[1].splitlines() if line[:1].isdigit()]
    assert rows == [["1", "2", "2", "liver +2"], ["2", "5", "3", "pancreas +2, liver +1"]]
    assert (tmp_path / "rounds_revised.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
