"""A train/validation split decided once per image and kept across rounds.

MONAI Label re-splits the datalist on every training, which moves images that trained the previous
model into validation. Here each image's side is written to a JSON file the first time the image is
seen, and never changed after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Dict, List, Sequence, Tuple

from lib.config import VAL_FRACTION
from lib.files import write_json_atomic

_lock = threading.Lock()


def image_key(item: Dict) -> str:
    return os.path.basename(str(item["image"]))


def _side_for(key: str, val_fraction: float, seed: int) -> str:
    # A hash, not a random draw: the same image lands on the same side on every machine.
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def persistent_split(
    datalist: Sequence[Dict], split_file: str, val_fraction: float = VAL_FRACTION, seed: int = 0, min_train: int = 1
) -> Tuple[List[Dict], List[Dict]]:
    """Split ``datalist`` by the sides recorded in ``split_file``; new images get a side and are recorded.

    While fewer than ``min_train`` images are on the train side, a new image goes to train.
    """
    with _lock:
        sides: Dict[str, str] = {}
        if os.path.exists(split_file):
            with open(split_file) as f:
                sides = json.load(f).get("sides", {})
        changed = False
        for item in sorted(datalist, key=image_key):
            key = image_key(item)
            if key not in sides:
                n_train = sum(1 for s in sides.values() if s == "train")
                sides[key] = "train" if n_train < min_train else _side_for(key, val_fraction, seed)
                changed = True
        if changed:
            write_json_atomic(split_file, {"val_fraction": val_fraction, "seed": seed, "sides": sides})
    train = [d for d in datalist if sides[image_key(d)] == "train"]
    val = [d for d in datalist if sides[image_key(d)] == "val"]
    return train, val
