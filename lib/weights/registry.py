"""Which weights file each backbone runs on, and where that file came from.

For each backbone the served model is, in order of preference:
1. ``<model_dir>/<backbone>_finetuned.pth``: published by the trainer after an active-learning round;
2. the released SuPreM file, from ``weights_dir`` (the user's copy) or ``<model_dir>`` (downloaded);
3. ``<model_dir>/starter_<backbone>.pth``: starter weights trained on phantoms when nothing else exists.
A JSON sidecar (``<file>.json``) beside a starter or fine-tuned file says how it was made.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol

from lib.files import file_version, read_json

from .download import DownloadError, download_released

logger = logging.getLogger(__name__)

HF_REPO = "MrGiovanni/SuPreM"
DEFAULT_ENDPOINT = "https://huggingface.co"
RELEASED_FILES: Dict[str, str] = {
    "unet": "supervised_suprem_unet_2100.pth",
    "swinunetr": "supervised_suprem_swinunetr_2100.pth",
    "segresnet": "supervised_suprem_segresnet_2100.pth",
}


class WeightsSource(Protocol):
    """What the networks ask of a registry: whether a backbone has weights, which file, and what to say of
    it. ``WeightsRegistry`` is one; ``lib.importance.scorer.FixedWeights`` (fixed files, e.g. in a Ray
    worker) another."""

    def available(self, backbone: str) -> bool: ...

    def current_path(self, backbone: str) -> Optional[str]: ...

    def info(self, backbone: str) -> Dict: ...


@dataclass
class ModelWeights:
    """What a backbone runs on. ``base`` is the released or starter file the fine-tuned model grew from."""

    backbone: str
    base: Optional[str] = None
    base_source: str = "none"  # released | starter | none
    problem: Optional[str] = None

    def as_info(self, published: Optional[str]) -> Dict:
        info = {"backbone": self.backbone, "source": self.base_source, "file": self.base}
        if published and os.path.exists(published):
            info.update({"source": "fine-tuned", "file": published, "base": self.base, "base_source": self.base_source})
            info.update(read_sidecar(published))
        elif self.base and self.base_source == "starter":
            info.update(read_sidecar(self.base))
        if info.get("file") and os.path.exists(info["file"]):
            st = os.stat(info["file"])
            info["version"] = file_version(info["file"])
            info["size"] = st.st_size
        if self.problem:
            info["problem"] = self.problem
        return info


def read_sidecar(path: str) -> Dict:
    return read_json(path + ".json", {})


class WeightsRegistry:
    """Finds, downloads and validates the weights of each backbone.

    ``validate(backbone, path)`` must raise if the file is not a checkpoint of that backbone (it is the
    key/shape check of ``lib.networks.load_checkpoint``).
    """

    def __init__(
        self,
        model_dir: str,
        validate: Callable[[str, str], None],
        weights_dir: Optional[str] = None,
        use_pretrained_model: bool = True,
        endpoint: Optional[str] = None,
        repo: str = HF_REPO,
    ):
        self.model_dir = model_dir
        self.weights_dir = weights_dir
        self.use_pretrained_model = use_pretrained_model
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        self.repo = repo
        self.validate = validate
        self.weights: Dict[str, ModelWeights] = {}
        # Published files checked so far: backbone -> ((size, mtime_ns), problem or None).
        self._published_checks: Dict[str, tuple] = {}
        self._published_lock = threading.Lock()

    def released_path(self, backbone: str) -> str:
        return os.path.join(self.model_dir, RELEASED_FILES[backbone])

    def starter_path(self, backbone: str) -> str:
        return os.path.join(self.model_dir, f"starter_{backbone}.pth")

    def published_path(self, backbone: str) -> str:
        return os.path.join(self.model_dir, f"{backbone}_finetuned.pth")

    def _valid(self, backbone: str, path: str) -> Optional[str]:
        try:
            self.validate(backbone, path)
            return None
        except Exception as e:  # the reason goes to the log and to /info/
            return str(e)

    def resolve(self, backbone: str) -> ModelWeights:
        """Find (or download) the base weights of ``backbone``; never raises for missing weights."""
        filename = RELEASED_FILES[backbone]
        mw = ModelWeights(backbone)
        problems = []
        candidates = []
        if self.weights_dir:
            candidates.append(os.path.join(self.weights_dir, filename))
        candidates.append(self.released_path(backbone))
        for path in candidates:
            if os.path.exists(path):
                err = self._valid(backbone, path)
                if err is None:
                    mw.base, mw.base_source = path, "released"
                    logger.info(f"{backbone}: released SuPreM weights {path}")
                    self.weights[backbone] = mw
                    return mw
                problems.append(f"{path} is not a valid {backbone} checkpoint: {err}")
                logger.error(f"{backbone}: {problems[-1]}")
        if self.use_pretrained_model:
            dest = self.released_path(backbone)
            try:
                download_released(filename, dest, self.endpoint, self.repo, lambda p: self.validate(backbone, p))
                mw.base, mw.base_source = dest, "released"
                logger.info(f"{backbone}: downloaded released SuPreM weights to {dest}")
                self.weights[backbone] = mw
                return mw
            except DownloadError as e:
                problems.append(str(e))
                where = self.weights_dir or self.model_dir
                logger.error(
                    f"{backbone}: SuPreM weights {filename} unavailable ({e}); put the file in {where} "
                    f"or pass --conf weights_dir PATH"
                )
        starter = self.starter_path(backbone)
        if os.path.exists(starter):
            err = self._valid(backbone, starter)
            if err is None:
                mw.base, mw.base_source = starter, "starter"
                logger.info(f"{backbone}: no released weights; serving starter weights {starter}")
                self.weights[backbone] = mw
                return mw
            problems.append(f"{starter} is not a valid {backbone} checkpoint: {err}")
        published = self.published_path(backbone)
        if os.path.exists(published) and self.published_problem(backbone) is None:
            mw.base, mw.base_source = None, "none"
            logger.info(f"{backbone}: serving fine-tuned weights {published}")
        else:
            logger.warning(f"{backbone}: no weights; this backbone is not offered")
        mw.problem = "; ".join(problems) if problems else f"no weights file for {backbone}"
        self.weights[backbone] = mw
        return mw

    def published_problem(self, backbone: str) -> Optional[str]:
        """Why the published fine-tuned file of ``backbone`` is refused, or None (valid, or no file).

        A published file can appear or change at any time (a round, a user copying one in), so it is
        checked like a released one, once per file state (size, mtime).
        """
        path = self.published_path(backbone)
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        with self._published_lock:
            seen = self._published_checks.get(backbone)
            if seen and seen[0] == stamp:
                return seen[1]
            err = self._valid(backbone, path)
            problem = f"{path} is not a valid {backbone} checkpoint: {err}" if err else None
            self._published_checks[backbone] = (stamp, problem)
            if problem:
                mw = self.weights.get(backbone)
                fallback = mw.base if mw and mw.base else "nothing (backbone not offered)"
                logger.error(f"{backbone}: published model refused, serving {fallback} instead: {problem}")
        return problem

    def current_path(self, backbone: str) -> Optional[str]:
        """The file to serve now: the published fine-tuned model if there is a valid one, else the base."""
        published = self.published_path(backbone)
        if os.path.exists(published) and self.published_problem(backbone) is None:
            return published
        mw = self.weights.get(backbone)
        return mw.base if mw else None

    def available(self, backbone: str) -> bool:
        return self.current_path(backbone) is not None

    def info(self, backbone: str) -> Dict:
        mw = self.weights.get(backbone) or ModelWeights(backbone)
        refused = self.published_problem(backbone)
        info = mw.as_info(None if refused else self.published_path(backbone))
        if refused:
            info["problem"] = "; ".join(p for p in (mw.problem, refused) if p)
        return info

    def summary(self) -> Dict[str, Dict]:
        return {b: self.info(b) for b in self.weights}
