"""Benchmark: Next Sample and Submit Label under 16 concurrent clients, with 1,000 images in the datastore.

A real ``monailabel start_server`` process (``testing.server.Server``) on 127.0.0.1 serves the app
(SegResNet, a synthetic checkpoint in the released format) on a studies folder of N small synthetic
CT volumes (16^3 voxels at 2 mm, int16 HU: air around a soft-tissue sphere). The images are tiny on
purpose: what is measured is the request path (strategy, datastore record, JSON, HTTP), not a network.

Importance scores are pre-filled: before the server starts, each image's datastore record gets an
``importance`` entry shaped like the one ``ImportanceScoring`` stores (score, 25 organs in priority
order, attention mL and heat per organ, model versions, file stamp), made by the current model file
and the file on disk, so MONAI Label's auto scoring finds every image current and scores nothing.
Scoring 1,000 volumes for real would take an hour on this CPU and is not what this benchmark is about.

Each phase runs C client threads, each with its own ``MONAILabelClient``, released together by a
barrier; each client sends R requests back to back and times each one. Reported per phase: requests
per second (all requests / wall time of the phase), p50/p95/max latency, errors. Phases, in order:

  next-sample importance   POST /activelearning/importance, unidentified (MONAI Label's client sends the
                           client_id given to its constructor, none here): every answer is new work,
                           as for 16 x R annotators each asking once
  next-sample random       POST /activelearning/random (MONAI Label's own strategy, for comparison)
  save-label               PUT /datastore/label, a valid final label for a different image each time;
                           after each 200 the client lists the final labels (GET /datastore/?output=train,
                           not timed, inside the phase's wall time) and counts whether its label is there

``--monailabel-env defaults`` (the default) runs the server with MONAI Label's own settings, as the
README's command does: datastore auto reload on and auto scoring on (MONAI Label queues a scoring run
after every Next Sample). ``--monailabel-env tests`` uses the test suite's (both off).

    .venv/bin/python -m bench.bench_load                      # 1,000 images, 16 clients
    .venv/bin/python -m bench.bench_load --images 200 --requests 5 --out /tmp/load.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

import nibabel as nib
import numpy as np

from bench.machine import machine_facts

ROOT = Path(__file__).resolve().parents[1]

SHAPE, SPACING = (16, 16, 16), 2.0
MODEL = "segresnet"


def write_studies(studies: Path, n: int) -> List[str]:
    """N tiny CT volumes (air and a 40 HU sphere); returns their ids."""
    studies.mkdir(parents=True)
    grid = np.indices(SHAPE).astype(np.float32) - (np.array(SHAPE)[:, None, None, None] - 1) / 2
    sphere = (grid**2).sum(0) < 6.0**2
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        img = np.where(sphere, 40, -1000).astype(np.int16) + rng.integers(-20, 20, SHAPE, dtype=np.int16)
        name = f"img_{i:04d}"
        nib.save(nib.Nifti1Image(img, affine), str(studies / f"{name}.nii.gz"))
        ids.append(name)
    return ids


def prefill_scores(studies: Path, ids: List[str], checkpoint: str) -> None:
    """Give every image an importance record as ImportanceScoring stores it, current for the served
    model file and the image file (so the server's auto scoring skips them all)."""
    from lib.classes import LABEL_SETS
    from lib.datastore import CheckedLocalDatastore
    from lib.files import file_stamp, file_version
    from lib.importance.records import INFO_KEY

    organs = list(LABEL_SETS["atlas25"])
    versions = {MODEL: file_version(checkpoint)}
    rng = random.Random(0)
    # The app's datastore: its public record (MONAI Label's own keeps it private).
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    for image_id in ids:
        priority = rng.sample(organs, len(organs))
        ml = {o: round(rng.uniform(0.1, 400.0), 3) for o in priority}
        ds.record.objects[image_id].image.info[INFO_KEY] = {
            "score": rng.randrange(10**5, 10**7),
            "organs": priority,
            "priority": priority,
            "attention_ml": ml,
            "heat": {o: round(v * 3.1, 3) for o, v in ml.items()},
            "models": versions,
            "entropy": "plogp",
            "normalised": False,
            "seconds": 2.0,
            "scored_at": "2025-01-01T00:00:00",
            "file": file_stamp(str(studies / f"{image_id}.nii.gz")),
        }
    ds.write_record()  # one write; through update_image_info it would be N whole-file writes


def label_for(studies: Path, image_id: str, folder: Path) -> str:
    img = nib.load(str(studies / f"{image_id}.nii.gz"))
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:11, 5:11, 5:11] = 6  # a liver
    path = folder / f"{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(path))
    return str(path)


def run_phase(
    name: str, url: str, clients: int, requests: int, make_call: Callable, tmpdir: Path, check: Optional[Callable] = None
) -> Dict:
    """C threads x R requests each, released together; latencies in seconds. ``check(client, c, r)``,
    when given, runs after each answered request (not timed, but inside the phase's wall time) and says
    whether what the request did shows (an error when it does not)."""
    from monailabel.client import MONAILabelClient

    barrier = threading.Barrier(clients + 1)
    lat: List[float] = []
    errors: List[str] = []
    answers: List = []
    checked = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def worker(c: int):
        client = MONAILabelClient(url, tmpdir=str(tmpdir))
        calls = [make_call(client, c, r) for r in range(requests)]
        barrier.wait()
        for r, call in enumerate(calls):
            t0 = time.perf_counter()
            try:
                out = call()
                ok = True
            except Exception as e:  # counted and shown, the phase goes on
                out, ok = repr(e)[:200], False
            dt = time.perf_counter() - t0
            seen = check(client, c, r) if ok and check else None
            with lock:
                (lat if ok else errors).append(dt if ok else out)
                if ok:
                    answers.append(out)
                if seen is not None:
                    checked["ok" if seen else "failed"] += 1

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return {
        "phase": name,
        "requests": len(lat) + len(errors),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 2),
        "rps": round((len(lat) + len(errors)) / wall, 2),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1),
        "answers": answers,
        **({"checked": checked} if check else {}),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per client in each next-sample phase")
    p.add_argument("--saves", type=int, default=10, help="labels saved per client in the save-label phase")
    p.add_argument("--monailabel-env", choices=["defaults", "tests"], default="defaults")
    p.add_argument("--label", default="", help="a name for this run in the output")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "load"), help="folder for results.json/.md")
    p.add_argument("--keep", action="store_true", help="keep the temporary studies folder")
    return p.parse_args(argv)


def start_server(work: Path, args: argparse.Namespace):
    """The studies folder (N scored images) and a real server on it, ready."""
    from lib.weights import RELEASED_FILES
    from testing.server import Server
    from testing.synthetic_weights import write_synthetic_checkpoint

    t0 = time.time()
    studies = work / "studies"
    ids = write_studies(studies, args.images)
    ckpt = write_synthetic_checkpoint(MODEL, str(work / "weights" / RELEASED_FILES[MODEL]))
    prefill_scores(studies, ids, ckpt)
    print(f"{args.images} images written and scored in {time.time() - t0:.1f} s", flush=True)
    conf = {
        "models": MODEL,
        "weights_dir": str(work / "weights"),
        "model_dir": str(work / "model"),
        "use_pretrained_model": "false",
        "overlap": "0",
    }
    env = {}
    if args.monailabel_env == "defaults":  # MONAI Label's own settings, not the test suite's
        env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true"}
    srv = Server(str(studies), conf, str(work), env=env)
    t0 = time.time()
    srv.wait_ready(timeout=600)
    print(f"server ready in {time.time() - t0:.1f} s; log {srv.log_path}", flush=True)
    return srv


def run_phases(srv, work: Path, args: argparse.Namespace) -> Dict:
    """The three phases on a ready server; their results and what the datastore lists afterwards."""
    from monailabel.client import MONAILabelClient

    probe = MONAILabelClient(srv.url)
    ds = probe.datastore()["objects"]
    assert len(ds) == args.images, len(ds)
    records = {k: v["image"]["info"]["importance"]["score"] for k, v in ds.items()}
    best = max(records, key=lambda k: (records[k], k))
    labels = work / "labels_to_send"
    labels.mkdir()
    # Save-label targets: different images for every request, the lowest scores (never handed out).
    targets = sorted(records, key=lambda k: records[k])[: args.clients * args.saves]
    label_files = {i: label_for(work / "studies", i, labels) for i in targets}

    def next_sample(strategy):
        return lambda client, c, r: (lambda: client.next_sample(strategy, {}))

    def save(client, c, r):
        image_id = targets[c * args.saves + r]
        return lambda: client.save_label(image_id, label_files[image_id], tag="final")

    def listed_at_once(client, c, r):
        """Read your writes: the very next listing of final labels (MONAI Label's ``output=train``, small
        where ``output=all`` is the whole record) holds the label just answered 200 for."""
        pairs = json.loads(urllib.request.urlopen(srv.url + "/datastore/?output=train", timeout=600).read())
        return f"{targets[c * args.saves + r]}.nii.gz" in {os.path.basename(p["image"]) for p in pairs}

    cases = [
        ("next-sample importance", next_sample("importance"), args.requests, None),
        ("next-sample random", next_sample("random"), args.requests, None),
        ("save-label", save, args.saves, listed_at_once),
    ]
    phases = []
    for name, make_call, n, check in cases:
        load_before = os.getloadavg()[0]
        res = run_phase(name, srv.url, args.clients, n, make_call, work, check)
        res["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        answers = res.pop("answers")
        if name == "next-sample importance":
            ids_out = [a.get("id") for a in answers]
            res["distinct_ids"] = len(set(ids_out))
            res["top_image_handed_out"] = best in ids_out
        phases.append(res)
        print(
            f"{name:24s} {res['requests']:5d} req  {res['rps']:7.2f} req/s  p50 {res['p50_ms']:8.1f} ms  "
            f"p95 {res['p95_ms']:8.1f} ms  max {res['max_ms']:8.1f} ms  errors {res['errors']}",
            flush=True,
        )
    after = probe.datastore()["objects"]
    saved_ok = sum(1 for i in targets if "final" in after[i]["labels"])
    return {
        "phases": phases,
        "labels_saved_and_listed": f"{saved_ok}/{len(targets)}",
        "labels_listed_at_once": "{ok}/{n}".format(n=len(targets), **phases[-1]["checked"]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        srv = start_server(work, args)
        try:
            measured = run_phases(srv, work, args)
            with open(srv.log_path, errors="replace") as f:
                scoring_runs = sum(1 for line in f if "COMMAND::" in line and "-m scoring" in line)
        finally:
            srv.stop()
        result = {
            "label": args.label,
            "images": args.images,
            "clients": args.clients,
            "monailabel_env": args.monailabel_env,
            **measured,
            "scoring_runs_started": scoring_runs,
            "machine": machine_facts(torch.device("cpu")),
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"results-{args.monailabel_env}{'-' + args.label if args.label else ''}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        table = format_table(result)
        (out / f"{stem}.md").write_text(table)
        print(table)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def format_table(result: Dict) -> str:
    lines = [
        f"{result['images']} images, {result['clients']} clients, MONAI Label settings: {result['monailabel_env']}"
        + (f" ({result['label']})" if result["label"] else ""),
        "",
        "| request | requests | req/s | p50 ms | p95 ms | max ms | errors | load avg before, after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ph in result["phases"]:
        lines.append(
            f"| {ph['phase']} | {ph['requests']} | {ph['rps']} | {ph['p50_ms']} | {ph['p95_ms']} | "
            f"{ph['max_ms']} | {ph['errors']} | {ph['load_1min'][0]}, {ph['load_1min'][1]} |"
        )
    lines.append("")
    lines.append(
        f"Labels listed by the next listing after their save: {result['labels_listed_at_once']}; saved and "
        f"listed after the phase: {result['labels_saved_and_listed']}; scoring runs the server started: "
        f"{result['scoring_runs_started']}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
