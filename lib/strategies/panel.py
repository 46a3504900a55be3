"""MONAI Label strategy ``random`` on a site whose OHIF panel cannot ask anything else."""

from __future__ import annotations

from typing import Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.random import Random


class RandomUnlessPanel(Strategy):
    """``random`` as ``--conf random_strategy importance`` serves it: the OHIF panel that MONAI Label 0.8.5
    bundles asks ``random`` whatever its Strategy list shows, and sends only the list's params, never a
    ``client_id``; MONAI Label's Python client (and the 3D Slicer plugin built on it) always sends one, null
    when it has none. A request without the key is the panel's and gets ``importance`` (its organ-level
    hand-outs included); one with it chose ``random`` and gets MONAI Label's Random."""

    def __init__(self, importance: Strategy, random: Optional[Strategy] = None):
        super().__init__(
            "Random, for clients that send a client_id (3D Slicer, MONAI Label's client); the importance "
            "strategy for OHIF's panel, whose Strategy list always asks random"
        )
        self.importance = importance
        self.random = random or Random()

    def __call__(self, request: Dict, datastore: Datastore):
        chosen = self.random if "client_id" in request else self.importance
        return chosen(request, datastore)
