"""Pre-processed volumes kept on disk between rounds (MONAI's PersistentDataset), keyed by the recipe.

Loading, reorienting and resampling a CT to 1.5 mm takes seconds per volume, and every round would
redo it for the whole pool (scoring) and for every labelled volume and backbone (training). A
``PreprocessCache`` keeps the deterministic part of the transform chain on disk:

- one folder per kind (``score``, ``train``, ``val``) and per *preprocessing key*: the recipe numbers
  that change the result (spacing, HU window, and what the caller adds: crop size, classes, label
  map) plus ``PREPROCESS_VERSION``. A recipe change gives a new key, so nothing made with the old
  recipe is read again; the folders of other keys of the same kind are deleted when a new key is used.
- cache entries are named by the item's file paths *and* their size and modification time, so a
  label revised in place, or an image replaced, is pre-processed again.
- MONAI writes each entry to a temporary file and renames it, and reads with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Dict, Optional, Sequence

from monai.data import PersistentDataset

logger = logging.getLogger(__name__)

# Bump when the pre-processing code changes in a way the recipe numbers do not show.
PREPROCESS_VERSION = 1


def stamped_hash(item) -> bytes:
    """Cache name of a data item: its values, plus size and mtime of every file it names."""
    stamped = {}
    for k, v in sorted(dict(item).items()):
        if isinstance(v, str) and os.path.isfile(v):
            st = os.stat(v)
            stamped[k] = [v, st.st_size, st.st_mtime_ns]
        else:
            stamped[k] = v
    dump = json.dumps(stamped, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(dump).hexdigest().encode("utf-8")


def preprocess_key(recipe_key: Dict, **extra) -> str:
    """Short hex key of everything that changes the pre-processed output."""
    parts = {"version": PREPROCESS_VERSION, "recipe": recipe_key, **extra}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


class PreprocessCache:
    """``<root>/<kind>/<key>/``: PersistentDataset entries of one pre-processing key."""

    def __init__(self, root: str, kind: str, key: str):
        self.root = root
        self.kind = kind
        self.key = key
        self.dir = os.path.join(root, kind, key)
        os.makedirs(self.dir, exist_ok=True)
        self._prune_other_keys()

    def _prune_other_keys(self):
        parent = os.path.join(self.root, self.kind)
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            if name != self.key and os.path.isdir(path):
                logger.info(f"pre-processing cache: removing {path} (made with another recipe)")
                shutil.rmtree(path, ignore_errors=True)

    def dataset(self, data: Sequence[Dict], transform) -> PersistentDataset:
        return PersistentDataset(data=list(data), transform=transform, cache_dir=self.dir, hash_func=stamped_hash)

    def entries(self) -> int:
        try:
            return sum(1 for n in os.listdir(self.dir) if n.endswith(".pt"))
        except OSError:
            return 0


def open_cache(root: Optional[str], kind: str, recipe_key: Dict, **extra) -> Optional[PreprocessCache]:
    """The cache for ``kind`` under ``root``, or None when caching is off (``root`` empty)."""
    if not root:
        return None
    return PreprocessCache(root, kind, preprocess_key(recipe_key, **extra))
