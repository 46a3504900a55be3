"""Phantom pools of one seed: an unlabeled pool and a test set of mixed sites with hard cases, and the
single-site set the starting model learns from. Every study is a pure function of (seed, role, index)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from testing.phantoms import HARD_CASES, ORGAN_CASES, SITES, make_phantom, write_phantom

ROLES = {"starter": 0, "pool": 1, "test": 2}


@dataclass
class Study:
    """One phantom written to disk: ``image`` (HU) and ``gt`` (its ground-truth label map)."""

    id: str
    image: str
    gt: str
    site: str
    hard: Optional[str]
    odd_organ: Optional[str] = None  # the organ an ORGAN_CASES hard case changed

    def tag(self) -> str:
        return f"{self.id}:{self.site}:{self.hard or '-'}" + (f"({self.odd_organ})" if self.odd_organ else "")


def study_seed(seed: int, role: str, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), ROLES[role], int(index)]).generate_state(1)[0])


def site_spacing(site: str, scale: float):
    return tuple(float(s) * scale for s in SITES[site].spacing_mm)


def _plan(n: int, sites, hard_fraction: float, rng: np.random.Generator):
    """(site, hard case) for n studies: sites in equal shares, ``hard_fraction`` of them hard cases
    (cycling through HARD_CASES, on sites in turn), in a shuffled order."""
    n_hard = int(round(hard_fraction * n))
    hard_order = list(HARD_CASES)
    rng.shuffle(hard_order)
    plan = []
    for i in range(n):
        site = sites[i % len(sites)]
        hard = hard_order[i % len(hard_order)] if i < n_hard else None
        plan.append((site, hard))
    order = rng.permutation(n)
    return [plan[i] for i in order]


def _realistic_plan(n: int, home: str, sites, shifted_fraction: float, rng: np.random.Generator):
    """(site, hard case) for n studies of a collection: ``1 - shifted_fraction`` of them from the ``home``
    site without a hard case (like the starter's own volumes), the rest other sites in turn, every
    other one of them a hard case (hard cases of the home site among them), in a shuffled order."""
    n_shifted = int(round(shifted_fraction * n))
    others = [s for s in sites if s != home] or [home]
    hard_order = list(HARD_CASES)
    rng.shuffle(hard_order)
    plan = [(home, None)] * (n - n_shifted)
    for i in range(n_shifted):
        hard = hard_order[(i // 2) % len(hard_order)] if i % 2 else None
        site = home if (hard and i % 6 == 5) else others[i % len(others)]
        plan.append((site, hard))
    order = rng.permutation(n)
    return [plan[i] for i in order]


def _organ_local_plan(n: int, home: str, fraction: float, rng: np.random.Generator):
    """(site, hard case) for n studies of the ``home`` site: ``fraction`` of them with an error confined to
    one organ (ORGAN_CASES in turn), the rest like the starter's own volumes, in a shuffled order."""
    n_local = int(round(fraction * n))
    plan = [(home, ORGAN_CASES[i % len(ORGAN_CASES)]) for i in range(n_local)] + [(home, None)] * (n - n_local)
    order = rng.permutation(n)
    return [plan[i] for i in order]


def make_studies(folder: str, gt_folder: str, role: str, n: int, seed: int, cfg, sites=None, hard_fraction=None,
                 prefix: Optional[str] = None, kind: str = "balanced") -> List[Study]:
    """Write ``n`` phantoms of ``role`` as ``folder/<prefix>_<i>.nii.gz``, ground truth in ``gt_folder``.

    kind: ``balanced`` (sites in equal shares with ``hard_fraction`` hard cases), ``realistic`` (the
    collection-like plan, ``cfg.shifted_fraction`` away from the starter's first site) or ``organ_local``
    (the starter's first site, ``hard_fraction`` of it with one organ unlike the starter's)."""
    sites = list(sites or cfg.sites)
    hf = cfg.hard_fraction if hard_fraction is None else hard_fraction
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), ROLES[role], 10_000]))
    home = cfg.starter_site.split(",")[0].strip()
    if kind == "realistic":
        plan = _realistic_plan(n, home, sites, cfg.shifted_fraction, rng)
    elif kind == "organ_local":
        plan = _organ_local_plan(n, home, hf, rng)
    else:
        plan = _plan(n, sites, hf, rng)
    out = []
    for i, (site, hard) in enumerate(plan):
        name = f"{prefix or role}_{i:03d}"
        ph = make_phantom(study_seed(seed, role, i), shape=cfg.shape, spacing_mm=site_spacing(site, cfg.spacing_scale),
                          site=site, hard=hard)
        image, gt = write_phantom(ph, folder, name, label_dir=os.path.abspath(gt_folder))
        out.append(Study(name, image, gt, site, hard, ph.meta.get("hypodense")))
    return out


def pool_studies(folder: str, gt_folder: str, n: int, seed: int, cfg) -> List[Study]:
    """The unlabelled pool of ``n`` phantoms as ``cfg.pool`` says (an organ-local pool has
    ``cfg.shifted_fraction`` of its volumes with one organ unlike the starter's)."""
    organ_local = cfg.pool == "organ_local"
    return make_studies(folder, gt_folder, "pool", n, seed, cfg, kind=cfg.pool,
                        hard_fraction=cfg.shifted_fraction if organ_local else None)


def by_id(studies: List[Study]) -> Dict[str, Study]:
    return {s.id: s for s in studies}
