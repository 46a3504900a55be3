"""Where volumes are scored: in this process, or on Ray workers (a local Ray or an existing cluster).

Both engines run the same per-volume step, ``score_one`` (pre-process, every backbone, attention,
record), and hand each record to the caller's ``on_result`` as soon as it is made, so the caller
(the server's scoring method or the offline ranking) stores it at once: a crash loses only the
volumes in flight. Both load the next volume while the current one is scored (``lib.importance.prefetch``).

``RayEngine``: one Ray actor per worker, each holding one GPU (or ``cpus_per_worker`` CPUs) and the
backbones loaded once; each worker scores one volume at a time, loading the one it gets next. A
worker that dies (killed, preempted, out of memory) is restarted and its volume retried
``retries`` times; after that the volume is reported as lost (no record is written, so a re-run scores
it). ``ray.init()`` starts a local Ray on this machine unless ``address`` names a cluster to join
(``auto``, or ``ray://host:10001``); the workers there must see the same paths (studies, weights,
this code).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lib.importance.failures import describe_error
from lib.importance.prefetch import Ahead, Feed, load, score_in_order, score_loaded
from lib.stopping import reinstall_stop_handlers

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINES = ("inprocess", "ray")

Job = Tuple[str, str]  # (image id, image file)
OnResult = Callable[[str, Dict], None]
StillWanted = Optional[Callable[[str], bool]]  # asked just before a volume is started; False: skip it


def score_one(scorer, path: str) -> Dict:
    """Score one volume; a study that cannot be scored gives a record with its error instead."""
    return score_loaded(scorer, load(scorer, path))


class InProcessEngine:
    """Scores the volumes one after the other in this process, the next one loaded meanwhile
    (``lib.importance.prefetch``; ``prefetch=False``: one at a time)."""

    name = "inprocess"

    def __init__(self, scorer, prefetch: bool = True):
        self.scorer = scorer
        self.prefetch = prefetch

    def run(self, jobs: Sequence[Job], on_result: OnResult, still_wanted: StillWanted = None) -> Dict:
        feed = score_in_order(self.scorer, jobs, on_result, still_wanted, prefetch=self.prefetch)
        return {"engine": self.name, "workers": 1, "lost": [], "not_started": feed.left(), "dropped": feed.dropped}


class ScoringWorker:
    """A Ray actor: builds the scorer once (backbones loaded on first use, then kept) and scores volumes,
    loading the next one it is told of (``next_path``) while it scores the current one."""

    def __init__(self, spec, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        # Ray hides the GPUs an actor did not ask for (CUDA_VISIBLE_DEVICES), so this is its own GPU or none.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = spec.build(self.device)
        self.ahead = Ahead(lambda path: load(self.scorer, path))
        self.volumes = 0
        self.started = time.time()

    def where(self) -> Dict:
        return {"pid": os.getpid(), "node": os.uname().nodename, "device": self.device}

    def score(self, path: str, next_path: Optional[str] = None) -> Dict:
        loaded = self.ahead.take(path)
        if next_path:
            self.ahead.start(next_path)
        record = score_loaded(self.scorer, loaded)
        self.volumes += 1
        return record

    def stats(self) -> Dict:
        return {
            "pid": os.getpid(),
            "node": os.uname().nodename,
            "device": self.device,
            "volumes": self.volumes,
            "networks_loaded": self.scorer.cache.loads,
            "loaded_ahead": self.ahead.hits,
            "seconds": round(time.time() - self.started, 1),
        }


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Join the Ray cluster at ``address``, or start a local one; returns the ``ray`` module."""
    # Ray's C++ crash handler would take SIGTERM from this process's own (``lib.stopping``: stop cleanly).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray

    if ray.is_initialized():
        return ray
    # Workers import this project's code: put it on their path (a cluster needs the same checkout path).
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    kwargs = dict(
        include_dashboard=False,
        ignore_reinit_error=True,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    reinstall_stop_handlers()  # ray.init made SIGTERM a plain sys.exit
    logger.info(f"Ray: {ray.cluster_resources()}")
    return ray


class RayEngine:
    """Scores the volumes on Ray workers; see the module docstring."""

    name = "ray"

    def __init__(
        self,
        scorer,
        address: Optional[str] = None,
        workers: int = 0,
        gpus_per_worker: Optional[float] = None,
        cpus_per_worker: int = 1,
        retries: int = 1,
    ):
        self.scorer = scorer
        self.address = address or None
        self.workers = int(workers or 0)
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = max(1, int(cpus_per_worker))
        self.retries = max(0, int(retries))
        self.actors: List = []
        self.worker_info: List[Dict] = []

    def _plan(self, ray, n_jobs: int) -> Tuple[int, float]:
        res = ray.cluster_resources()
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
        if self.workers:
            n = self.workers
        elif gpus:
            n = int(res.get("GPU", 0) // gpus)
        else:
            n = int(res.get("CPU", 1) // self.cpus_per_worker)
        return max(1, min(n, n_jobs)), gpus

    def run(self, jobs: Sequence[Job], on_result: OnResult, still_wanted: StillWanted = None) -> Dict:
        jobs = list(jobs)
        if not jobs:
            return {"engine": self.name, "workers": 0, "lost": [], "not_started": [], "dropped": []}
        ray = init_ray(self.address)
        from ray.exceptions import RayError

        n, gpus = self._plan(ray, len(jobs))
        spec = self.scorer.spec()
        actor_cls = ray.remote(ScoringWorker).options(
            num_cpus=self.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=self.retries,
            max_task_retries=self.retries,
        )
        threads = 0 if gpus else self.cpus_per_worker
        self.actors = [actor_cls.remote(spec, threads) for _ in range(n)]
        self.worker_info = ray.get([a.where.remote() for a in self.actors])
        logger.info(
            f"Ray: {len(jobs)} volumes on {n} workers ({gpus} GPU, {self.cpus_per_worker} CPU each): "
            + ", ".join(f"{w['node']}:{w['pid']} {w['device']}" for w in self.worker_info)
        )
        feed = Feed(jobs, still_wanted)
        queue, dropped = feed.queue, feed.dropped
        pending: Dict = {}
        alive = set(range(n))
        lost: List[str] = []

        def submit(i: int):
            job, following = feed.next_for(i)  # nothing once the process is stopping
            if job is not None:
                pending[self.actors[i].score.remote(job[1], following)] = (i, job[0])

        for i in range(n):
            submit(i)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, image_id = pending.pop(ref)
            try:
                record = ray.get(ref)
            except RayError as e:
                # The worker died with this volume (after Ray's restarts and retries): the volume is lost.
                lost.append(image_id)
                logger.error(f"Ray worker {i} lost {image_id}: {describe_error(e).splitlines()[0][:300]}")
                if self.retries == 0:
                    alive.discard(i)  # not restartable
                    feed.give_back(i)
                    if not alive:
                        logger.error(f"no Ray worker left; {len(queue)} volumes not started")
                    continue
                submit(i)
                continue
            on_result(image_id, record)
            submit(i)
        stats = []
        for i in sorted(alive):
            try:
                stats.append(ray.get(self.actors[i].stats.remote(), timeout=60))
            except RayError:
                pass
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        return {
            "engine": self.name,
            "workers": n,
            "lost": lost,
            "not_started": feed.left(),
            "dropped": dropped,
            "worker_stats": stats,
        }


def make_engine(scorer, engine: str = "inprocess", **ray_options):
    if engine == "inprocess":
        return InProcessEngine(scorer)
    if engine == "ray":
        return RayEngine(scorer, **ray_options)
    raise ValueError(f"unknown scoring engine {engine!r}: choose one of {', '.join(ENGINES)}")


def shutdown_ray() -> None:
    """Leave Ray if this process joined it; a Ray that ``init_ray`` started here ends with its workers."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
