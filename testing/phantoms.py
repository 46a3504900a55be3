"""Synthetic abdominal CT phantoms.

No real scan may ship with the product, so demos, tests and the active-learning benchmark run on
these: an int16 CT volume in Hounsfield units (HU) with a uint8 label map in SuPreM class indices
(``lib.classes``), all 25 ``atlas25`` structures present, plus unlabelled body wall, spine, ribs,
pelvis and heart so that a model sees the usual negatives.

Geometry
    Arrays are indexed ``(x, y, z)`` = ``(i, j, k)`` voxels and the affine is diagonal with positive
    spacing, i.e. nibabel's RAS+ convention (``nib.aff2axcodes(affine) == ('R', 'A', 'S')``): world
    x (mm) grows toward the patient's Right, y toward Anterior, z toward Superior. So the liver sits
    at *high* i, the spleen at low i.

    Anatomy is laid out in a "reference body" (mm, same axes, origin on the midline at the level of
    the celiac trunk) and scaled so that the body fills most of the in-plane field of view and the
    site's cranio-caudal range fills the z extent; a smooth random displacement field then warps it.

Public API: :func:`make_phantom`, :func:`write_phantom`, :func:`make_sample_studies`,
:class:`PhantomSite`, :data:`SITES`, :data:`HARD_CASES`, :data:`ORGAN_CASES`, :func:`organ_hu`.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.files import atomic_open

STRUCTURES: List[str] = list(LABEL_SETS["atlas25"])
PHASES: Tuple[str, ...] = ("native", "arterial", "portal")
HARD_CASES: Tuple[str, ...] = ("missing_organ", "enlarged_organ", "touching", "low_contrast", "streaks")
# Hard cases whose error is confined to one organ, the rest of the volume as usual. Kept out of HARD_CASES,
# whose pools (and results) stay as they were: a benchmark asks for them by name.
ORGAN_CASES: Tuple[str, ...] = ("hypodense_organ",)
# A solid organ that enhances far less than usual: a steatotic liver, an infarcted spleen, a kidney that
# does not function, a pancreas with pancreatitis or a tumour. It keeps its shape and its label.
_HYPODENSE_ORGANS: Tuple[str, ...] = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")
_HYPODENSE_HU: Tuple[float, float] = (20.0, 45.0)
_KNOWN_CASES: Tuple[str, ...] = HARD_CASES + ORGAN_CASES  # what make_phantom's ``hard`` accepts

# Designed mean attenuation (HU) per contrast phase: (native, arterial, portal venous).
# Each phantom jitters these by a few HU; meta["organ_hu"] records what was actually painted.
_ORGAN_HU: Dict[str, Tuple[float, float, float]] = {
    "spleen": (45, 120, 110),
    "kidney_right": (32, 170, 155),
    "kidney_left": (32, 170, 155),
    "gall_bladder": (8, 8, 10),
    "esophagus": (38, 55, 60),
    "liver": (58, 75, 105),
    "stomach": (22, 30, 32),  # fluid content; a gas cap is added on top
    "aorta": (42, 300, 165),
    "postcava": (40, 90, 150),
    "portal_vein_and_splenic_vein": (40, 120, 175),
    "pancreas": (42, 110, 90),
    "adrenal_gland_right": (28, 65, 60),
    "adrenal_gland_left": (28, 65, 60),
    "duodenum": (30, 45, 50),
    "hepatic_vessel": (40, 80, 170),
    "lung_right": (-850, -850, -850),
    "lung_left": (-850, -850, -850),
    "colon": (5, 10, 15),  # stool; gas pockets are added on top
    "intestine": (28, 45, 55),
    "rectum": (15, 20, 22),
    "bladder": (8, 8, 12),
    "prostate": (38, 60, 70),
    "femur_left": (1000, 1000, 1000),  # cortex; the marrow inside is _TISSUE_HU["marrow"]
    "femur_right": (1000, 1000, 1000),
    "celiac_trunk": (42, 290, 160),
}
assert set(_ORGAN_HU) == set(STRUCTURES), "HU table must cover exactly the atlas25 structures"

# Unlabelled tissue (HU), per phase where contrast matters.
_TISSUE_HU: Dict[str, Tuple[float, float, float]] = {
    "air": (-1000, -1000, -1000),
    "fat": (-105, -105, -105),
    "visceral_fat": (-95, -95, -95),
    "muscle": (45, 55, 60),
    "bone": (700, 700, 700),
    "marrow": (380, 380, 380),
    "disc": (80, 80, 80),
    "csf": (12, 12, 12),
    "blood": (40, 280, 150),  # heart chambers, iliac vessels
    "gas": (-900, -900, -900),
    "metal": (3000, 3000, 3000),
}

_LABEL_MIN_VOXELS = 20  # what "visible" means for the guarantee that every structure is painted
_HU_MIN, _HU_MAX = -1024, 3071


def organ_hu(name: str, phase: str = "portal") -> float:
    """Designed mean HU of a labelled structure (or unlabelled tissue) in a contrast phase."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    table = _ORGAN_HU if name in _ORGAN_HU else _TISSUE_HU
    return float(table[name][PHASES.index(phase)])


@dataclass(frozen=True)
class PhantomSite:
    """Acquisition protocol of a simulated scanner site.

    phase: contrast phase (``native``, ``arterial``, ``portal``), which sets organ/vessel HU.
    noise_hu: standard deviation of the (slightly correlated) image noise, HU.
    spacing_mm: voxel size (x, y, z), mm.
    z_range_mm: cranio-caudal part of the reference body covered by the scan, mm (0 = celiac trunk
        origin, + superior). The full body runs from femoral heads (about -280) to the heart
        (about +165); a narrower range crops the field of view. Keep it within about
        (-280, +130) so that femoral heads and lung bases stay in.
    blur_vox: reconstruction-kernel blur (Gaussian sigma, voxels in-plane).
    """

    name: str
    phase: str = "portal"
    noise_hu: float = 10.0
    spacing_mm: Tuple[float, float, float] = (1.5, 1.5, 2.5)
    z_range_mm: Tuple[float, float] = (-295.0, 165.0)
    blur_vox: float = 0.6

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}; choose one of {', '.join(PHASES)}")
        lo, hi = self.z_range_mm
        if not (lo <= -275 and hi >= 125):
            raise ValueError(f"z_range_mm {self.z_range_mm} would crop femoral heads or lung bases")
        if self.noise_hu < 0 or min(self.spacing_mm) <= 0:
            raise ValueError("noise_hu must be >= 0 and spacing_mm > 0")


SITES: Dict[str, PhantomSite] = {
    "A": PhantomSite("A", phase="portal", noise_hu=10.0, spacing_mm=(1.5, 1.5, 2.5), z_range_mm=(-295, 165)),
    "B": PhantomSite("B", phase="arterial", noise_hu=18.0, spacing_mm=(1.6, 1.6, 3.0), z_range_mm=(-285, 150),
                     blur_vox=0.5),
    "C": PhantomSite("C", phase="native", noise_hu=7.0, spacing_mm=(1.25, 1.25, 2.0), z_range_mm=(-280, 135),
                     blur_vox=0.7),
    "D": PhantomSite("D", phase="portal", noise_hu=25.0, spacing_mm=(1.75, 1.75, 2.5), z_range_mm=(-290, 155),
                     blur_vox=0.9),
}
DEFAULT_SITE = "A"


@dataclass
class Phantom:
    """One synthetic study.

    image: int16 HU, shape (x, y, z) voxels, RAS voxel order.
    label: uint8 SuPreM class indices (0 = background, 1..25 = atlas25), same shape.
    affine: 4x4 voxel-to-world (RAS+, mm).
    meta: seed, site, hard case, spacing_mm, phase, noise_hu, organ_hu, and what a hard case did.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in np.abs(np.diag(self.affine)[:3]))


# --------------------------------------------------------------------------------------------
# Shapes in the reference body


@dataclass
class _Ell:
    """Ellipsoid: centre c (mm), semi-axes r (mm) along the columns of rotation R."""

    c: np.ndarray
    r: np.ndarray
    R: Optional[np.ndarray] = None
    bump: float = 0.07  # relative radius wobble from the shared bump field


@dataclass
class _Tube:
    """Capsule chain through points (N, 3) with radius per point (mm)."""

    pts: np.ndarray
    radii: np.ndarray
    bump: float = 0.06


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _spline(pts, radii, k: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom resampling so that tubes bend smoothly instead of kinking at control points."""
    P = np.asarray(pts, float)
    r = np.broadcast_to(np.asarray(radii, float), (len(P),))
    if len(P) < 3 or k <= 1:
        return P, np.array(r)
    ext = np.vstack([2 * P[0] - P[1], P, 2 * P[-1] - P[-2]])
    s = (np.arange(k) / k)[:, None]
    out, rad = [], []
    for i in range(len(P) - 1):
        p0, p1, p2, p3 = ext[i : i + 4]
        out.append(0.5 * (2 * p1 + (p2 - p0) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * s**3))
        rad.append(r[i] * (1 - s[:, 0]) + r[i + 1] * s[:, 0])
    out.append(P[-1:])
    rad.append(r[-1:])
    return np.vstack(out), np.concatenate(rad)


def _tube(pts, radii, k: int = 4, bump: float = 0.06) -> _Tube:
    p, r = _spline(pts, radii, k)
    return _Tube(p, r, bump)


# --------------------------------------------------------------------------------------------
# Voxel grid with the warp


def _kernel(n: int, c: int) -> np.ndarray:
    """(n, c) Gaussian interpolation weights from c control points to n samples on [0, 1]."""
    u = (np.arange(n) + 0.5) / n
    p = np.linspace(0.0, 1.0, c)
    h = 0.75 / (c - 1)
    w = np.exp(-0.5 * ((u[:, None] - p[None, :]) / h) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _upsample(coeffs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Smooth field on the voxel grid from coarse coefficients.

    Separable matrix products instead of ndimage.zoom: about 10x cheaper and the result does not
    depend on the grid beyond sampling, so one seed gives the same anatomy at any shape."""
    a, b, c = coeffs.shape
    nx, ny, nz = shape
    t = coeffs.astype(np.float32) @ _kernel(nz, c).T  # (a, b, nz)
    t = np.einsum("yb,abz->ayz", _kernel(ny, b), t)  # (a, ny, nz)
    out = (_kernel(nx, a) @ t.reshape(a, ny * nz)).reshape(nx, ny, nz)
    return np.ascontiguousarray(out, dtype=np.float32)


class _Grid:
    """Voxel grid: reference-body coordinates of every voxel after the warp."""

    def __init__(self, shape, spacing, centre_vox, scale, z_range, disp, bump):
        self.shape = tuple(int(n) for n in shape)
        nx, ny, nz = self.shape
        dx, dy, dz = spacing
        lo, hi = z_range
        self.ax = [
            ((np.arange(nx) - centre_vox[0]) * dx / scale[0]).astype(np.float32),
            ((np.arange(ny) - centre_vox[1]) * dy / scale[1]).astype(np.float32),
            (lo + (np.arange(nz) + 0.5) * (hi - lo) / nz).astype(np.float32),
        ]
        self.voxel_ref = np.array([dx / scale[0], dy / scale[1], (hi - lo) / nz])  # voxel size, ref mm
        self.disp = disp  # (3, nx, ny, nz) ref mm
        self.dmax = np.abs(disp).reshape(3, -1).max(1) + 1e-3
        self.bump = bump

    def box(self, lo, hi) -> Optional[Tuple[slice, slice, slice]]:
        """Index slices of voxels whose warped coordinates can fall inside [lo, hi] (ref mm)."""
        sl = []
        for a in range(3):
            i0 = int(np.searchsorted(self.ax[a], lo[a] - self.dmax[a], "left"))
            i1 = int(np.searchsorted(self.ax[a], hi[a] + self.dmax[a], "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        return (
            self.ax[0][sl[0]][:, None, None] + self.disp[0][sl],
            self.ax[1][sl[1]][None, :, None] + self.disp[1][sl],
            self.ax[2][sl[2]][None, None, :] + self.disp[2][sl],
        )


def _inner(sl, outer):
    """Slices of box sl relative to the enclosing box outer."""
    return tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sl, outer))


def _shape_bounds(shape, grow: float):
    if isinstance(shape, _Ell):
        ext = float(np.max(shape.r)) * (1 + 3 * shape.bump) + grow
        return [(shape.c - ext, shape.c + ext)]
    out = []
    for i in range(len(shape.pts) - 1):
        a, b = shape.pts[i], shape.pts[i + 1]
        ext = max(shape.radii[i], shape.radii[i + 1]) * (1 + 3 * shape.bump) + grow
        out.append((np.minimum(a, b) - ext, np.maximum(a, b) + ext))
    return out


def _fill(g: _Grid, shape, U, mask, grow: float = 0.0, scale_r: float = 1.0):
    """OR one shape into mask (a bool array over box U)."""
    if isinstance(shape, _Ell):
        bounds = _shape_bounds(shape, grow)
        sl = g.box(*bounds[0])
        if sl is None:
            return
        sl = tuple(slice(max(s.start, u.start), min(s.stop, u.stop)) for s, u in zip(sl, U))
        if any(s.stop <= s.start for s in sl):
            return
        X, Y, Z = g.coords(sl)
        d = (X - shape.c[0], Y - shape.c[1], Z - shape.c[2])
        R = np.eye(3) if shape.R is None else shape.R
        r = shape.r * scale_r + grow
        q = 0.0
        for k in range(3):
            comp = (d[0] * R[0, k] + d[1] * R[1, k] + d[2] * R[2, k]) / r[k]
            q = q + comp * comp
        f = 1.0 + shape.bump * g.bump[sl]
        mask[_inner(sl, U)] |= q <= f * f
        return
    bounds = _shape_bounds(shape, grow)
    for i, (lo, hi) in enumerate(bounds):
        sl = g.box(lo, hi)
        if sl is None:
            continue
        sl = tuple(slice(max(s.start, u.start), min(s.stop, u.stop)) for s, u in zip(sl, U))
        if any(s.stop <= s.start for s in sl):
            continue
        a, b = shape.pts[i], shape.pts[i + 1]
        ra, rb = shape.radii[i] * scale_r + grow, shape.radii[i + 1] * scale_r + grow
        d = b - a
        L2 = float(d @ d) or 1e-6
        X, Y, Z = g.coords(sl)
        ex, ey, ez = X - a[0], Y - a[1], Z - a[2]
        t = np.clip((ex * d[0] + ey * d[1] + ez * d[2]) / L2, 0.0, 1.0)
        ex -= t * d[0]
        ey -= t * d[1]
        ez -= t * d[2]
        rad = (ra + t * (rb - ra)) * (1.0 + shape.bump * g.bump[sl])
        mask[_inner(sl, U)] |= ex * ex + ey * ey + ez * ez <= rad * rad


Where = Callable[[tuple, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _render(g: _Grid, parts, holes=(), where: Optional[Where] = None, grow: float = 0.0, scale_r: float = 1.0):
    """Union of parts minus holes, clipped by where(slices, X, Y, Z); (box slices, mask) or None."""
    bounds = [b for p in parts for b in _shape_bounds(p, grow)]
    if not bounds:
        return None
    lo = np.min([b[0] for b in bounds], 0)
    hi = np.max([b[1] for b in bounds], 0)
    U = g.box(lo, hi)
    if U is None:
        return None
    mask = np.zeros(tuple(s.stop - s.start for s in U), bool)
    for p in parts:
        _fill(g, p, U, mask, grow, scale_r)
    if holes:
        hole = np.zeros_like(mask)
        for h in holes:
            _fill(g, h, U, hole)
        mask &= ~hole
    if where is not None and mask.any():
        mask &= where(U, *g.coords(U))
    if not mask.any():
        return None
    return U, mask


def _box_region(g: _Grid, lo, hi, where: Where):
    U = g.box(lo, hi)
    if U is None:
        return None
    mask = where(U, *g.coords(U))
    return (U, mask) if mask.any() else None


# --------------------------------------------------------------------------------------------
# The plan: every random anatomical choice, drawn in a fixed order so that hard cases and sites
# change only what they are about.

_BODY_Z = np.array([-420, -250, -180, -120, 0, 80, 200], np.float32)
_BODY_A = np.array([172, 172, 168, 160, 158, 150, 148], np.float32)  # half width
_BODY_BA = np.array([100, 100, 102, 104, 105, 110, 112], np.float32)  # anterior half depth
_BODY_BP = np.array([125, 125, 128, 132, 135, 138, 140], np.float32)  # posterior half depth
_SPINE_Z = np.array([-420, -250, -190, -150, -100, 0, 100, 200], np.float32)
_SPINE_Y = np.array([-95, -95, -92, -60, -54, -60, -66, -70], np.float32)


class _Draws:
    """The random draws of the plan, all from one generator, in the order they are asked for."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def normal(self, sd, size=None):
        """Zero-mean normal draws of standard deviation ``sd``: one float, or an array of ``size``."""
        return self.rng.normal(0.0, sd, size)

    def jitter(self, sd) -> np.ndarray:
        """A random 3-vector offset (mm), normal with standard deviation ``sd``."""
        return self.rng.normal(0.0, sd, 3)

    def uniform(self, lo, hi) -> float:
        """One uniform draw from [lo, hi)."""
        return float(self.rng.uniform(lo, hi))

    def scale(self, lo=0.88, hi=1.12) -> np.ndarray:
        """Three uniform scale factors from [lo, hi), one per axis."""
        return self.rng.uniform(lo, hi, 3)

    def path(self, pts, s_all=4.0, s_each=3.0) -> np.ndarray:
        """Control points ``pts`` (N, 3) shifted together by a ``s_all`` jitter, then each by a ``s_each`` one."""
        pts = np.asarray(pts, float)
        return pts + self.jitter(s_all) + self.rng.normal(0.0, s_each, pts.shape)


def _plan(rng: np.random.Generator) -> dict:
    """Shapes (reference mm) and per-patient parameters. The draws happen in a fixed order and no
    later step draws from this generator, so one seed is one patient whatever the grid or site.

    Returns the plan: the patient parameters of :func:`_plan_patient`, ``organs`` (name -> list of
    shapes), ``femur_heads`` (name -> centre) and the unlabelled shapes of :func:`_plan_unlabelled`.
    """
    draw = _Draws(rng)
    p = _plan_patient(draw)
    organs = p["organs"]
    midline_x = draw.uniform(-3, 3)  # midline shift of the retroperitoneum
    organs.update(_plan_solid_organs(draw, midline_x))
    organs.update(_plan_upper_gut(draw, midline_x))
    organs.update(_plan_great_vessels(draw, midline_x))
    organs["hepatic_vessel"] = _plan_hepatic_vessels(draw)
    organs.update(_plan_bowel_and_pelvic_organs(draw))
    p["femur_heads"], femurs = _plan_femurs(draw)
    organs.update(femurs)
    p.update(_plan_unlabelled(draw, p["femur_heads"]))
    return p


def _plan_patient(draw: _Draws) -> dict:
    """Whole-patient parameters: warp and bump field coefficients, body size, fat and wall thickness,
    diaphragm domes, per-structure HU jitter, disc phase. Returns them in a new plan dict, whose
    ``organs`` is still empty."""
    p: dict = {"organs": {}}
    p["disp"] = draw.normal(1.0, (3, 4, 4, 6))
    p["disp_mm"] = draw.uniform(5.0, 9.0)
    p["bump"] = draw.normal(1.0, (9, 9, 14))
    p["body_w"] = draw.uniform(0.95, 1.05)
    p["belly"] = draw.uniform(0.92, 1.10)
    p["fat_mm"] = draw.uniform(8.0, 26.0)
    p["wall_mm"] = draw.uniform(9.0, 13.0)
    p["dome"] = (draw.uniform(108, 120), draw.uniform(98, 110))  # right, left diaphragm dome height
    p["hu_jitter"] = {n: float(draw.normal(5.0)) for n in STRUCTURES}
    p["disc_phase"] = draw.uniform(0, 32)
    return p


def _plan_solid_organs(draw: _Draws, midline_x: float) -> Dict[str, list]:
    """Solid upper-abdominal organs: liver, spleen, kidneys, adrenal glands, gall bladder
    (``midline_x``: shift of the retroperitoneum, mm). Returns their shapes by name."""
    organs: Dict[str, list] = {}
    liver_centre = np.array([70.0, -5.0, 52.0]) + draw.jitter(5)
    organs["liver"] = [
        _Ell(liver_centre, np.array([62.0, 70.0, 72.0]) * draw.scale(), _rot(*draw.normal(6, 3)), 0.06),
        _Ell(np.array([8.0, 38.0, 64.0]) + draw.jitter(6), np.array([55.0, 32.0, 36.0]) * draw.scale(),
             _rot(0, 0, draw.uniform(-15, 5)), 0.06),
    ]
    organs["spleen"] = [_Ell(np.array([-95.0, -35.0, 52.0]) + draw.jitter(6),
                             np.array([20.0, 40.0, 50.0]) * draw.scale(),
                             _rot(draw.uniform(20, 35), 0, draw.uniform(-30, -10)), 0.06)]
    kidney_dz = draw.uniform(-8, 8)
    organs["kidney_right"] = [_Ell(np.array([64.0 + midline_x, -45.0, -28.0 + kidney_dz]) + draw.jitter(4),
                                   np.array([27.0, 24.0, 52.0]) * draw.scale(0.92, 1.08),
                                   _rot(0, -15 + draw.uniform(-5, 5), draw.uniform(20, 35)), 0.04)]
    organs["kidney_left"] = [_Ell(np.array([-64.0 + midline_x, -45.0, -12.0 + kidney_dz]) + draw.jitter(4),
                                  np.array([27.0, 24.0, 52.0]) * draw.scale(0.92, 1.08),
                                  _rot(0, 15 + draw.uniform(-5, 5), -draw.uniform(20, 35)), 0.04)]
    organs["adrenal_gland_right"] = [_Ell(np.array([44.0 + midline_x, -36.0, 40.0]) + draw.jitter(3),
                                          np.array([7.0, 15.0, 18.0]) * draw.scale(0.9, 1.1),
                                          _rot(0, 0, draw.uniform(-35, -15)), 0.05)]
    organs["adrenal_gland_left"] = [_Ell(np.array([-42.0 + midline_x, -34.0, 34.0]) + draw.jitter(3),
                                         np.array([7.0, 15.0, 18.0]) * draw.scale(0.9, 1.1),
                                         _rot(0, 0, draw.uniform(15, 35)), 0.05)]
    organs["gall_bladder"] = [_Ell(np.array([52.0, 40.0, 2.0]) + draw.jitter(5),
                                   np.array([14.0, 14.0, 30.0]) * draw.scale(),
                                   _rot(draw.uniform(30, 50), draw.uniform(-10, 10), 0), 0.05)]
    return organs


def _plan_upper_gut(draw: _Draws, midline_x: float) -> Dict[str, list]:
    """Hollow viscera of the upper abdomen (stomach, esophagus, duodenum) and the pancreas.
    Returns their shapes by name."""
    return {
        "stomach": [_tube(draw.path([[-50, -8, 88], [-58, 10, 65], [-55, 25, 42], [-35, 42, 18], [-5, 45, 8],
                                     [20, 34, 6]]),
                          np.array([30, 32, 30, 24, 18, 13]) * draw.uniform(0.85, 1.15), bump=0.08)],
        "esophagus": [_tube(draw.path([[-2 + midline_x, -30, 175], [-6, -24, 140], [-15, -12, 112], [-30, 0, 95],
                                       [-42, 0, 86]], 2.0, 1.5),
                            np.array([8, 8, 8, 9, 10]), bump=0.04)],
        "duodenum": [_tube(draw.path([[20, 34, 6], [42, 14, 8], [50, -4, -10], [48, -6, -40], [28, -1, -60],
                                      [-5, 0, -62], [-25, -2, -46], [-32, 6, -30]]),
                           np.full(8, 11.0) * draw.uniform(0.9, 1.1))],
        "pancreas": [_tube(draw.path([[30, -4, -32], [24, 0, -18], [10, 6, -8], [-25, 6, 0], [-58, -6, 14],
                                      [-78, -18, 24]]),
                           np.array([15, 14, 12, 11, 10, 8]) * draw.uniform(0.88, 1.12), bump=0.1)],
    }


def _plan_great_vessels(draw: _Draws, midline_x: float) -> Dict[str, list]:
    """Aorta, postcava (inferior vena cava), celiac trunk and portal/splenic vein.
    Returns their shapes by name."""
    organs: Dict[str, list] = {}
    organs["aorta"] = [_tube(draw.path([[-28 + midline_x, -45, 180], [-18 + midline_x, -33, 90],
                                        [-12 + midline_x, -28, 20], [-10 + midline_x, -26, -60],
                                        [-8 + midline_x, -24, -145]], 2.0, 1.5),
                             np.array([13, 12, 11, 10, 9]) * draw.uniform(0.9, 1.1), bump=0.03)]
    organs["postcava"] = [_tube(draw.path([[22 + midline_x, -22, -145], [22 + midline_x, -22, -60], [25, -22, 0],
                                           [28, -24, 50], [16, -15, 108], [12, -8, 128]], 2.0, 1.5),
                                np.array([10, 11, 12, 12, 13, 13]) * draw.uniform(0.9, 1.1), bump=0.03)]
    aorta = organs["aorta"][0]
    celiac_z = draw.uniform(5, 12)
    origin = aorta.pts[np.argmin(np.abs(aorta.pts[:, 2] - celiac_z))]  # celiac leaves the aorta's front wall
    organs["celiac_trunk"] = [
        _tube(origin + np.array([[0, 6, 0], [1, 22, 3], [4, 28, 7]]) + draw.normal(1.5, (3, 3)),
              [5.5, 5.5, 5.0], 3, 0.03),
        _tube(origin + np.array([[4, 28, 7], [20, 26, 9], [34, 20, 10]]) + draw.normal(2, (3, 3)),
              [4.5, 4.0, 4.0], 3, 0.03),
        _tube(origin + np.array([[4, 28, 7], [-14, 24, 10], [-30, 18, 12]]) + draw.normal(2, (3, 3)),
              [4.5, 4.0, 4.0], 3, 0.03),
    ]
    organs["portal_vein_and_splenic_vein"] = [_tube(draw.path([[-80, -26, 26], [-45, -10, 4], [-5, -6, -8], [15, -2, 8],
                                                               [35, 3, 25], [55, 5, 36]], 3.0, 2.0),
                                                    [5, 6, 7, 7.5, 7, 6], bump=0.03)]
    return organs


def _plan_hepatic_vessels(draw: _Draws) -> list:
    """Hepatic veins and intrahepatic portal branches. Returns their shapes (one tube each)."""
    branches = []
    for start, end, r0 in (
        ([16, -15, 108], [110, -15, 62], 6),  # right hepatic vein
        ([16, -15, 108], [62, 35, 52], 5),  # middle
        ([16, -15, 108], [-5, 42, 76], 5),  # left
        ([55, 5, 36], [98, 25, 30], 5),  # portal branches
        ([55, 5, 36], [100, -32, 26], 5),
        ([55, 5, 36], [5, 34, 56], 4),
    ):
        start, end = np.array(start, float), np.array(end, float) + draw.jitter(6)
        mid = (start + end) / 2 + draw.jitter(6)
        branches.append(_tube([start, mid, end], [r0, r0 * 0.8, 3.0], 3, 0.05))
    return branches


def _small_bowel_walk(draw: _Draws) -> np.ndarray:
    """Centre line of the small bowel: a persistent random walk kept inside the mesenteric space.
    Returns its 65 points (mm)."""
    walk = [np.array([-32.0, 6.0, -32.0])]
    direction = np.array([0.3, 0.5, -0.8])
    centre, radii = np.array([0.0, 22.0, -125.0]), np.array([72.0, 46.0, 75.0])
    for _ in range(64):
        direction = direction + draw.normal(0.7, 3)
        nxt = walk[-1] + 17.0 * direction / np.linalg.norm(direction)
        if np.sum(((nxt - centre) / radii) ** 2) > 1.0:  # turn back into the mesenteric space
            direction = (centre - walk[-1]) / np.linalg.norm(centre - walk[-1]) + draw.normal(0.3, 3)
            nxt = walk[-1] + 17.0 * direction / np.linalg.norm(direction)
        walk.append(nxt)
    return np.array(walk)


def _plan_bowel_and_pelvic_organs(draw: _Draws) -> Dict[str, list]:
    """Small bowel (a random walk), colon (a jittered frame), rectum, bladder and prostate.
    Returns their shapes by name."""
    walk = _small_bowel_walk(draw)
    organs: Dict[str, list] = {}
    organs["intestine"] = [_Tube(walk, np.full(len(walk), 11.5) * draw.uniform(0.9, 1.1), 0.08)]
    organs["colon"] = [_tube(draw.path([[72, 12, -125], [86, -2, -92], [82, 2, -55], [70, 25, -36], [35, 48, -55],
                                        [0, 52, -72], [-40, 48, -52], [-82, 25, -16], [-94, -6, -50], [-90, -6, -110],
                                        [-80, 5, -150], [-50, 28, -170], [-15, 20, -184], [-4, -25, -196],
                                        [0, -45, -206]], 3.0, 3.0),
                             np.array([26, 24, 22, 22, 21, 21, 21, 21, 20, 19, 18, 17, 16, 16, 17])
                             * draw.uniform(0.85, 1.1), bump=0.1)]
    organs["rectum"] = [_tube(draw.path([[0, -45, -206], [0, -56, -240], [0, -44, -278], [0, -28, -300]], 2.0, 2.0),
                              [17, 19, 15, 10], bump=0.06)]
    organs["bladder"] = [_Ell(np.array([0.0, 34.0, -226.0]) + draw.jitter(4),
                              np.array([38.0, 31.0, 27.0]) * draw.scale(0.8, 1.15), None, 0.04)]
    organs["prostate"] = [_Ell(np.array([0.0, 16.0, -262.0]) + draw.jitter(2),
                               np.array([17.0, 13.0, 14.0]) * draw.scale(0.9, 1.15), None, 0.05)]
    return organs


def _plan_femurs(draw: _Draws) -> Tuple[Dict[str, np.ndarray], Dict[str, list]]:
    """Femora: head, neck, greater trochanter, shaft. Returns (head centre by femur name, shapes by
    femur name), right femur first."""
    heads: Dict[str, np.ndarray] = {}
    organs: Dict[str, list] = {}
    for name, sx in (("femur_right", 1.0), ("femur_left", -1.0)):
        head = np.array([sx * 92.0, 5.0, -258.0]) + draw.jitter(2)
        heads[name] = head
        organs[name] = [
            _Ell(head, np.full(3, 23.0) * draw.uniform(0.95, 1.05), None, 0.01),
            _tube([head, head + [sx * 30, -8, -26]], [15, 15], 1, 0.02),
            _Ell(head + [sx * 38, -12, -30], np.array([16.0, 18.0, 20.0]), None, 0.03),
            _tube([head + [sx * 34, -10, -30], head + [sx * 30, -4, -160]], [16, 15], 1, 0.02),
        ]
    return heads, organs


def _plan_unlabelled(draw: _Draws, femur_heads: Dict[str, np.ndarray]) -> dict:
    """Unlabelled structures: heart, pelvic bones, psoas, iliac vessels, acetabula, sacrum (the lungs
    come from the diaphragm dome). Returns them by plan key."""
    shapes: dict = {}
    shapes["heart"] = _Ell(np.array([-15.0, 30.0, 172.0]) + draw.jitter(5),
                           np.array([66.0, 46.0, 55.0]) * draw.scale(0.95, 1.05), _rot(0, 0, -20), 0.03)
    shapes["pelvis"] = []
    shapes["psoas"] = []
    shapes["iliac"] = []
    for sx in (1.0, -1.0):
        head = femur_heads["femur_right" if sx > 0 else "femur_left"]
        shapes["pelvis"] += [
            # Iliac wing: a plate from the sacroiliac joint (posteromedial) to the anterior spine (anterolateral).
            _Ell(np.array([sx * 88.0, -50.0, -178.0]), np.array([10.0, 46.0, 50.0]), _rot(0, sx * 10, -sx * 35), 0.04),
            _tube([head + [-sx * 16, 14, -6], [sx * 10, 46, -272]], [10, 9], 1, 0.04),  # pubic ramus
            _tube([head + [-sx * 10, -16, -6], [sx * 58, -22, -302]], [13, 11], 1, 0.04),  # ischium
            _tube([head + [-sx * 4, -10, 26], [sx * 80, -36, -150]], [20, 14], 1, 0.04),  # iliac body
        ]
        shapes["psoas"].append(_tube([[sx * 24, -52, -10], [sx * 36, -46, -100], [sx * 52, -30, -170],
                                      [sx * 74, -6, -232]], [6, 17, 20, 14], 3, 0.05))
        shapes["iliac"].append(_tube([[sx * 4 - 8, -24, -140], [sx * 45 - 4, -26, -188], [sx * 78, -6, -238]],
                                     [7, 6.5, 6], 3, 0.03))
        shapes["iliac"].append(_tube([[sx * 8 + 22, -22, -140], [sx * 40 + 2, -34, -190], [sx * 72, -14, -240]],
                                     [8, 8, 7.5], 3, 0.03))
    shapes["acetabula"] = [_Ell(femur_heads[n], np.full(3, 32.0), None, 0.0) for n in ("femur_right", "femur_left")]
    shapes["sacrum"] = _Ell(np.array([0.0, -92.0, -198.0]), np.array([44.0, 17.0, 48.0]), _rot(-25, 0, 0), 0.03)
    return shapes


# --------------------------------------------------------------------------------------------
# Hard cases: a separate generator, so the rest of the anatomy stays that of the same seed.


def _scale_organ(parts, f: float, drop_mm: float = 0.0):
    out = []
    for s in parts:
        if isinstance(s, _Ell):
            out.append(replace(s, r=s.r * f, c=s.c - [0, 0, drop_mm]))
        else:
            out.append(replace(s, radii=s.radii * f, pts=s.pts - [0, 0, drop_mm]))
    return out


def _apply_hard(p: dict, hard: Optional[str], rng: np.random.Generator) -> dict:
    p["missing"], p["enlarged"], p["metal"] = [], [], []
    p["kidney_gap"] = True
    p["low_contrast"] = False
    p["hypodense"] = None
    if hard is None:
        return p
    o = p["organs"]
    if hard == "missing_organ":
        gone = ["gall_bladder"]  # cholecystectomy is the commonest absent organ
        if rng.random() < 0.8:
            gone.append(str(rng.choice(["kidney_left", "kidney_right"])))
        if rng.random() < 0.3:
            gone.append("spleen")
        for n in gone:
            o[n] = []
        p["missing"] = gone
    elif hard == "enlarged_organ":
        f = float(rng.uniform(1.35, 1.6))
        o["spleen"] = _scale_organ(o["spleen"], f, drop_mm=40 * (f - 1))  # splenomegaly extends caudally
        p["enlarged"] = [("spleen", f)]
        if rng.random() < 0.5:
            g = float(rng.uniform(1.12, 1.25))
            o["liver"] = _scale_organ(o["liver"], g, drop_mm=50 * (g - 1))
            p["enlarged"].append(("liver", g))
    elif hard == "touching":
        # No fat plane between kidneys and liver/spleen, and the kidneys ride up into them.
        p["kidney_gap"] = False
        o["kidney_right"] = [replace(s, c=s.c + [0, 4, 14]) for s in o["kidney_right"]]
        o["kidney_left"] = [replace(s, c=s.c + [-8, 4, 14]) for s in o["kidney_left"]]
        o["spleen"] = _scale_organ(o["spleen"], 1.08)
        o["liver"] = _scale_organ(o["liver"], 1.05)
        o["stomach"] = [replace(s, pts=s.pts + [-8, -4, 0]) for s in o["stomach"]]  # onto the spleen
    elif hard == "low_contrast":
        p["low_contrast"] = True
        p["low_contrast_spread"] = float(rng.uniform(3.0, 8.0))
        p["low_contrast_offsets"] = {n: float(rng.uniform(-1, 1)) for n in STRUCTURES}
    elif hard == "streaks":
        kind = str(rng.choice(["hip_both", "hip_right", "hip_left", "spine"]))
        if kind.startswith("hip"):
            sides = {"hip_both": ["femur_right", "femur_left"], "hip_right": ["femur_right"],
                     "hip_left": ["femur_left"]}[kind]
            p["metal"] = [(p["femur_heads"][n], 20.0) for n in sides]
        else:
            z = float(rng.uniform(-110, -40))
            ys = float(np.interp(z, _SPINE_Z, _SPINE_Y))
            # Pedicle screws: two per level, two levels, aimed obliquely into the vertebral body.
            p["metal"] = [(np.array([sx * 10.0, ys - 12.0, z + dz]), 5.0) for sx in (1, -1) for dz in (-16, 16)]
        p["metal_kind"] = kind
        p["streak_angles"] = rng.uniform(0, np.pi, int(rng.integers(10, 18)))
        p["streak_gain"] = float(rng.uniform(250, 450))
    elif hard == "hypodense_organ":
        p["hypodense"] = (str(rng.choice(_HYPODENSE_ORGANS)), float(rng.uniform(*_HYPODENSE_HU)))
    else:
        raise ValueError(f"unknown hard case {hard!r}; choose one of {', '.join(_KNOWN_CASES)} or None")
    return p


# --------------------------------------------------------------------------------------------
# Rendering


class _Painter:
    def __init__(self, g: _Grid, p: dict, phase: str):
        self.g, self.p = g, p
        self.ph = PHASES.index(phase)
        self.label = np.zeros(g.shape, np.uint8)
        self.hu = np.full(g.shape, _TISSUE_HU["air"][0], np.float32)
        self.organ_hu: Dict[str, float] = {}

    def tissue(self, name):
        return float(_TISSUE_HU[name][self.ph])

    def paint(self, region, label: Optional[int], hu: float, only_label: Optional[int] = None):
        if region is None:
            return
        sl, m = region
        if only_label is not None:
            m = m & (self.label[sl] == only_label)
        if label is not None:
            self.label[sl][m] = label
        self.hu[sl][m] = hu

    # Body frame --------------------------------------------------------------------------
    def body(self):
        """Skin outline, subcutaneous fat, muscular wall, ribs; fills the abdominal cavity with fat."""
        g, p = self.g, self.p
        X, Y, Z = g.coords((slice(None),) * 3)
        # The outline changes slowly along z, so its profile is looked up per slice, not per voxel.
        z = g.ax[2][None, None, :]
        A = np.interp(z, _BODY_Z, _BODY_A * p["body_w"]).astype(np.float32)
        Ba = np.interp(z, _BODY_Z, _BODY_BA * p["belly"]).astype(np.float32)
        Bp = np.interp(z, _BODY_Z, _BODY_BP).astype(np.float32)
        pelvic = np.clip((-150.0 - z) / 60.0, 0.0, 1.0)
        front = Y >= 0
        ax2 = np.square(X)

        def level(inset):
            # Superellipse "radius": flatter at the back (power 2.5), where the patient lies on the table.
            yn = np.where(front, Y / np.maximum(Ba - inset, 1.0), -Y / np.maximum(Bp - inset, 1.0))
            return ax2 / np.square(np.maximum(A - inset, 1.0)) + np.where(front, yn * yn, yn * yn * np.sqrt(yn))

        fat = p["fat_mm"]
        wall = p["wall_mm"] + 30.0 * pelvic * np.where(front, 0.25, 1.0)  # gluteal muscles are behind
        self.body_mask = level(0.0) <= 1.0
        muscle = level(fat) <= 1.0
        self.cavity = level(fat + wall) <= 1.0
        self.hu[self.body_mask] = self.tissue("fat")
        self.hu[muscle] = self.tissue("muscle")
        self.hu[self.cavity] = self.tissue("visceral_fat")
        # Ribs: oblique bony bands just outside the cavity, lower laterally than in front.
        k0 = int(np.searchsorted(g.ax[2], -40.0 - g.dmax[2]))
        up = (slice(None), slice(None), slice(k0, None))
        if k0 < g.shape[2]:
            Xu, Yu, Zu = X[up], Y[up], Z[up]
            yn = np.where(front[up], Yu / np.maximum(Ba[up] - fat - wall[up] - 8.0, 1.0),
                          -Yu / np.maximum(Bp[up] - fat - wall[up] - 8.0, 1.0))
            inner = ax2[up] / np.square(np.maximum(A[up] - fat - wall[up] - 8.0, 1.0)) + np.where(
                front[up], yn * yn, yn * yn * np.sqrt(yn))
            band = np.mod(Zu + 0.35 * (Yu + 100.0), 30.0) < 9.0
            low = -40.0 + 100.0 * np.clip(Yu / Ba[up], 0, 1)
            ribs = (inner > 1.0) & muscle[up] & band & (Zu > low) & ((np.abs(Xu) > 25) | (Yu < 0))
            self.hu[up][ribs] = self.tissue("bone")

    def in_cavity(self, sl, X, Y, Z):
        return self.cavity[sl]

    def dome(self, X, Y):
        """Diaphragm height (ref mm) over (X, Y): two domes, lower toward the flanks and back."""
        zr, zl = self.p["dome"]
        # Steeper toward the back: the posterior costophrenic recesses reach lowest.
        fall = 30.0 * ((Y + 5.0) / 85.0) ** 2 + 25.0 * (np.minimum(Y + 5.0, 0.0) / 85.0) ** 2
        right = zr - 50.0 * ((X - 55.0) / 85.0) ** 2 - fall
        left = zl - 50.0 * ((X + 55.0) / 85.0) ** 2 - fall
        w = 1.0 / (1.0 + np.exp(-X / 15.0))
        return w * right + (1 - w) * left

    def below_dome(self, sl, X, Y, Z):
        return self.cavity[sl] & (Z < self.dome(X, Y) - 4.0)

    def spine(self):
        """Vertebrae (cortex, marrow, discs, canal) and paraspinal muscles; unlabelled."""
        g, p = self.g, self.p
        U = g.box((-70, -200, -420), (70, 40, 400))
        if U is None:
            return
        X, Y, Z = g.coords(U)
        yc = np.interp(Z, _SPINE_Z, _SPINE_Y)
        Yr = Y - yc
        rx = np.where(Z < 40, 24.0, 18.0)  # lumbar bodies are wider
        body = (X / rx) ** 2 + (Yr / 17.0) ** 2 <= 1.0
        body_in = (X / (rx - 3.5)) ** 2 + (Yr / 13.5) ** 2 <= 1.0
        arch = ((X / 20.0) ** 2 + ((Yr + 38) / 15.0) ** 2 <= 1.0) | ((X / 6.0) ** 2 + ((Yr + 55) / 14.0) ** 2 <= 1.0)
        canal = X ** 2 + (Yr + 28) ** 2 <= 81.0
        disc = np.mod(Z + p["disc_phase"], 32.0) < 7.0
        keep = Z > -175.0  # the sacrum takes over below
        para = ((((np.abs(X) - 32) / 22.0) ** 2 + ((Yr + 42) / 20.0) ** 2) <= 1.0) & (Z > -215.0) & self.body_mask[U]
        self.paint((U, para), 0, self.tissue("muscle"))
        self.paint((U, keep & ((body & ~disc) | (arch & ~canal))), 0, self.tissue("bone"))
        self.paint((U, keep & body_in & ~disc), 0, self.tissue("marrow"))
        self.paint((U, keep & body & disc), 0, self.tissue("disc"))
        self.paint((U, keep & canal), 0, self.tissue("csf"))

    def pelvis(self):
        g, p = self.g, self.p
        for s in p["psoas"]:
            self.paint(_render(g, [s]), 0, self.tissue("muscle"))
        for s in p["iliac"]:
            self.paint(_render(g, [s], where=self.in_cavity), 0, self.tissue("blood"))
        bone = self.tissue("bone")
        self.paint(_render(g, [p["sacrum"]]), 0, bone)
        self.paint(_render(g, [p["sacrum"]], scale_r=0.75), 0, self.tissue("marrow"))
        for s in p["pelvis"]:
            self.paint(_render(g, [s]), 0, bone)
        for acet, head in zip(p["acetabula"], p["femur_heads"].values()):
            sgn = np.sign(head[0])

            def medial_upper(sl, X, Y, Z, head=head, sgn=sgn):
                return ((X - head[0]) * sgn < 12.0) & (Z - head[2] > -14.0)

            self.paint(_render(g, [acet], where=medial_upper), 0, bone)

    # Labelled structures -------------------------------------------------------------------
    def hu_of(self, name: str) -> float:
        p = self.p
        v = _ORGAN_HU[name][self.ph] + p["hu_jitter"][name]
        if p["hypodense"] and p["hypodense"][0] == name:
            v = p["hypodense"][1]  # whatever the phase: the organ does not enhance
        if p["low_contrast"] and name not in ("lung_right", "lung_left", "femur_left", "femur_right"):
            # Every soft-tissue structure within a few HU of the liver: boundaries only from texture.
            ref = _ORGAN_HU["liver"][self.ph] + p["hu_jitter"]["liver"]
            v = ref + p["low_contrast_spread"] * p["low_contrast_offsets"][name]
        self.organ_hu[name] = float(v)
        return float(v)

    def organ(self, name, where=None, only_label=None):
        parts = self.p["organs"][name]
        if not parts:
            return None
        region = _render(self.g, parts, where=where)
        self.paint(region, CLASS_INDEX[name], self.hu_of(name), only_label=only_label)
        return region

    def lungs(self):
        g = self.g
        for name, side in (("lung_right", 1.0), ("lung_left", -1.0)):

            def f(sl, X, Y, Z, side=side):
                # Mediastinum: an oval around spine, aorta and oesophagus, wider on the left (heart).
                half = (26.0 if side > 0 else 34.0) + 0.3 * np.clip(Y + 20.0, 0.0, None)
                medi = ((X + 5.0) / half) ** 2 + (np.minimum(Y + 20.0, 0.0) / 95.0) ** 2 <= 1.0
                return self.cavity[sl] & (Z > self.dome(X, Y) + 4.0) & (side * (X + 5.0) > 0) & ~medi

            self.paint(_box_region(g, (-200, -200, 30), (200, 200, 400), f), CLASS_INDEX[name], self.hu_of(name))
        # The diaphragm between lungs and abdomen.
        def diaphragm(sl, X, Y, Z):
            return self.cavity[sl] & (np.abs(Z - self.dome(X, Y)) <= 4.0)

        self.paint(_box_region(g, (-200, -200, 0), (200, 200, 400), diaphragm), 0, self.tissue("muscle"))
        self.paint(_render(g, [self.p["heart"]], where=lambda sl, X, Y, Z: self.cavity[sl] & (Z > self.dome(X, Y) + 4.0)),
                   0, self.tissue("blood"))

    def carve_then_paint(self, name, victims: Sequence[str]):
        """Paint a retroperitoneal organ and, unless a hard case says otherwise, clear a fat plane
        between it and the intraperitoneal organs it presses on, so that they never touch."""
        parts = self.p["organs"][name]
        if not parts:
            return
        if self.p["kidney_gap"]:
            gap = 1.3 * float(self.g.voxel_ref.max()) + 1.0
            ring = _render(self.g, parts, grow=gap)
            if ring is not None:
                sl, m = ring
                lab = self.label[sl]
                hit = m & np.isin(lab, [CLASS_INDEX[v] for v in victims])
                lab[hit] = 0
                self.hu[sl][hit] = self.tissue("visceral_fat")
        self.organ(name, where=self.in_cavity)

    def renal_sinus(self):
        """Fat at each kidney's medial notch, so that kidneys look bean-shaped rather than like eggs."""
        for name, sgn in (("kidney_right", 1.0), ("kidney_left", -1.0)):
            for s in self.p["organs"][name]:
                R = np.eye(3) if s.R is None else s.R
                hilum = s.c + R @ np.array([-sgn * 0.95 * s.r[0], 0.35 * s.r[1], 0.0])
                notch = _render(self.g, [_Ell(hilum, np.array([0.5, 0.5, 0.45]) * s.r[[0, 0, 2]], R, 0.05)])
                self.paint(notch, 0, self.tissue("visceral_fat"), only_label=CLASS_INDEX[name])

    def femurs(self):
        for name in ("femur_right", "femur_left"):
            parts = self.p["organs"][name]
            self.organ(name, where=lambda sl, X, Y, Z: self.body_mask[sl])
            region = _render(self.g, parts, scale_r=0.72)
            self.paint(region, None, self.tissue("marrow"), only_label=CLASS_INDEX[name])

    def contents(self):
        """Gas in stomach, colon and rectum, without changing labels."""
        gas = self.tissue("gas")
        lab = self.label
        # Pockets where the smooth bump field is highest inside the organ, so the gas fraction is
        # fixed (the stool still dominates the median) but the pockets' places vary with the seed.
        for name, frac in (("colon", 0.3), ("rectum", 0.12)):
            inside = lab == CLASS_INDEX[name]
            if inside.any():
                b = self.g.bump[inside]
                self.hu[inside & (self.g.bump > np.quantile(b, 1.0 - frac))] = gas
        idx = np.nonzero(lab == CLASS_INDEX["stomach"])
        if idx[0].size:
            # Supine patient: gas rises to the anterior (highest y) part of the stomach.
            y = self.g.ax[1][idx[1]] + self.g.disp[1][idx]
            top = y > np.quantile(y, 0.86)
            self.hu[tuple(i[top] for i in idx)] = gas

    def metal(self):
        for centre, r in self.p["metal"]:
            self.paint(_render(self.g, [_Ell(np.asarray(centre, float), np.full(3, r), None, 0.0)]), None,
                       self.tissue("metal"))


def _streaks(hu: np.ndarray, body: np.ndarray, g: _Grid, p: dict, spacing) -> None:
    """Metal artefact: alternating bright/dark streaks fanning out in-plane from each metal object
    over the slices it occupies, plus the dark band between two objects (beam hardening)."""
    nx, ny, nz = g.shape
    xi = np.arange(nx, dtype=np.float32)[:, None] * spacing[0]
    yj = np.arange(ny, dtype=np.float32)[None, :] * spacing[1]
    width = 0.8 * max(spacing[0], spacing[1])  # mm; a streak is about a voxel wide
    gain = p["streak_gain"] / math.sqrt(len(p["metal"]))  # several small objects: each streaks less
    sources = []
    for n_src, (c, r) in enumerate(p["metal"]):
        ci = float(np.interp(c[0], g.ax[0], np.arange(nx))) * spacing[0]
        cj = float(np.interp(c[1], g.ax[1], np.arange(ny))) * spacing[1]
        k0 = int(np.searchsorted(g.ax[2], c[2] - r))
        k1 = max(int(np.searchsorted(g.ax[2], c[2] + r)), k0 + 1)
        sources.append((ci, cj, k0, min(k1, nz)))
        dx, dy = xi - ci, yj - cj
        decay = gain / (1.0 + np.sqrt(dx * dx + dy * dy) / 40.0)
        pattern = np.zeros((nx, ny), np.float32)
        for n, th in enumerate(p["streak_angles"] + 0.37 * n_src):
            perp = np.abs(dx * math.sin(th) - dy * math.cos(th))
            pattern += (1.0 if n % 2 == 0 else -1.0) * decay * np.exp(-0.5 * (perp / width) ** 2)
        k0, k1 = sources[-1][2:]
        hu[:, :, k0:k1] += pattern[:, :, None] * body[:, :, k0:k1]
    if len(sources) == 2:
        (ai, aj, a0, a1), (bi, bj, b0, b1) = sources
        k0, k1 = max(a0, b0), min(a1, b1)
        if k1 > k0:
            d = np.array([bi - ai, bj - aj])
            t = np.clip(((xi - ai) * d[0] + (yj - aj) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
            perp = np.hypot(xi - ai - t * d[0], yj - aj - t * d[1])
            band = -0.5 * p["streak_gain"] * np.exp(-0.5 * (perp / 8.0) ** 2)
            hu[:, :, k0:k1] += band[:, :, None] * body[:, :, k0:k1]


def _resolve_site(site) -> PhantomSite:
    """The :class:`PhantomSite` of a site, a key of :data:`SITES` or None (the default site)."""
    if site is None:
        return SITES[DEFAULT_SITE]
    if isinstance(site, str):
        try:
            return SITES[site]
        except KeyError:
            raise ValueError(f"unknown site {site!r}; choose one of {', '.join(SITES)}") from None
    return site


def _checked_request(shape, spacing_mm, site, hard) -> Tuple[PhantomSite, Tuple[int, ...], Tuple[float, ...]]:
    """The resolved site, the shape (ints) and the spacing (the site's when ``spacing_mm`` is None) of a
    :func:`make_phantom` request; ``ValueError`` for an unknown site or hard case, or a bad shape or spacing."""
    site = _resolve_site(site)
    if hard is not None and hard not in _KNOWN_CASES:
        raise ValueError(f"unknown hard case {hard!r}; choose one of {', '.join(_KNOWN_CASES)} or None")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 sizes >= 16 voxels, got {shape}")
    spacing = tuple(float(s) for s in (spacing_mm if spacing_mm is not None else site.spacing_mm))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be 3 positive sizes, got {spacing}")
    return site, shape, spacing


@dataclass
class _Placement:
    """Where the reference body lies in the field of view."""

    centre_vox: Tuple[float, float]  # voxel (i, j) of the reference body's in-plane origin
    scale: Tuple[float, float, float]  # mm per reference mm along x, y, z
    z_range: Tuple[float, float]  # reference z (mm) covered by the scan
    origin: np.ndarray  # world position (mm) of voxel (0, 0, 0)


def _place_patient(shape, spacing, site: PhantomSite, p: dict, rng: np.random.Generator) -> _Placement:
    """Patient size and placement in the field of view (draws from ``rng`` only). Returns the placement."""
    nx, ny, nz = shape
    fov = np.array(shape) * np.array(spacing)
    frac = rng.uniform(0.80, 0.90)
    sx = frac * fov[0] / 2.0 / float(_BODY_A.max() * p["body_w"])
    sy = min(sx * rng.uniform(0.92, 1.05), 0.94 * fov[1] / float(_BODY_BA.max() * p["belly"] + _BODY_BP.max()))
    z_lo, z_hi = (float(v) for v in site.z_range_mm)
    sz = fov[2] / (z_hi - z_lo)
    body_mid_y = (float(_BODY_BA.max() * p["belly"]) - float(_BODY_BP.max())) / 2.0  # ref mm
    cx = (nx - 1) / 2.0 + rng.uniform(-0.03, 0.03) * nx
    cy = (ny - 1) / 2.0 - body_mid_y * sy / spacing[1] + rng.uniform(-0.03, 0.03) * ny
    origin = np.array([
        -cx * spacing[0] + rng.uniform(-15, 15),
        -cy * spacing[1] + rng.uniform(-40, 10),
        round(float(rng.uniform(-700, -300)), 1),
    ])
    return _Placement((cx, cy), (sx, sy, sz), (z_lo, z_hi), origin)


def _warped_grid(shape, spacing, p: dict, placement: _Placement) -> _Grid:
    """The voxel grid of the plan's displacement and bump fields at ``shape``. Returns the grid."""
    disp = np.stack([_upsample(c, shape) for c in p["disp"]])
    disp *= p["disp_mm"] / max(float(disp.std()), 1e-6)
    bump = _upsample(p["bump"], shape)
    bump /= max(float(bump.std()), 1e-6)
    np.clip(bump, -2.5, 2.5, out=bump)
    return _Grid(shape, spacing, placement.centre_vox, placement.scale, placement.z_range, disp, bump)


def _paint_anatomy(g: _Grid, p: dict, phase: str) -> _Painter:
    """Paints body, skeleton, lungs and every planned structure in order (later ones overwrite
    earlier ones), then bowel gas and metal. Returns the painter, holding ``hu`` and ``label``."""
    painter = _Painter(g, p, phase)
    painter.body()
    painter.spine()
    painter.pelvis()
    painter.lungs()
    for name in ("intestine", "colon", "rectum", "bladder", "prostate"):
        painter.organ(name, where=painter.in_cavity)
    painter.femurs()
    painter.organ("spleen", where=painter.below_dome)
    painter.organ("liver", where=painter.below_dome)
    painter.organ("esophagus", where=painter.in_cavity)
    painter.organ("stomach", where=painter.below_dome)
    for name in ("pancreas", "duodenum", "gall_bladder"):
        painter.organ(name, where=painter.in_cavity)
    painter.organ("hepatic_vessel", only_label=CLASS_INDEX["liver"])  # vessels only inside the liver parenchyma
    painter.organ("portal_vein_and_splenic_vein", where=painter.in_cavity)
    painter.organ("postcava", where=painter.in_cavity)
    painter.organ("aorta")
    painter.organ("celiac_trunk", where=painter.in_cavity)
    for name in ("kidney_right", "kidney_left", "adrenal_gland_right", "adrenal_gland_left"):
        painter.carve_then_paint(name, ["liver", "spleen"])
    painter.renal_sinus()
    painter.contents()
    if p["metal"]:
        painter.metal()
    return painter


def _acquire(painter: _Painter, site: PhantomSite, spacing, rng: np.random.Generator) -> Tuple[np.ndarray, float]:
    """The scanner's view of the painted HU: parenchymal texture, reconstruction blur (partial volume),
    metal streaks, noise (draws from ``rng`` only). Returns (int16 image, noise sigma in HU)."""
    g, p, shape = painter.g, painter.p, painter.g.shape
    hu = painter.hu
    tex = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5)
    tex *= 6.0 / max(float(tex.std()), 1e-6)
    hu += tex * painter.body_mask
    b = site.blur_vox
    hu = ndimage.gaussian_filter(hu, (b, b, b * spacing[0] / spacing[2] + 0.2), truncate=3.0)
    if p["metal"]:
        _streaks(hu, painter.body_mask, g, p, spacing)
    noise_sigma = site.noise_hu * (1.3 if p["low_contrast"] else 1.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.6, truncate=3.0)
    hu += noise * (noise_sigma / max(float(noise.std()), 1e-6))
    return np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16), noise_sigma


def _phantom_meta(seed, site: PhantomSite, hard, spacing, shape, placement: _Placement, noise_sigma, painter) -> dict:
    """The ``Phantom.meta`` of a study: request, acquisition, painted HU and what a hard case did."""
    p, g = painter.p, painter.g
    meta = {
        "seed": int(seed),
        "site": site.name,
        "hard": hard,
        "phase": site.phase,
        "spacing_mm": spacing,
        "shape": shape,
        "noise_hu": float(noise_sigma),
        "z_range_mm": placement.z_range,
        "organ_hu": dict(painter.organ_hu),
        "missing": list(p["missing"]),
        "enlarged": [(n, float(f)) for n, f in p["enlarged"]],
    }
    if p["hypodense"]:
        meta["hypodense"] = p["hypodense"][0]
    if p["metal"]:
        meta["metal"] = p["metal_kind"]
        meta["metal_slices"] = sorted({int(np.searchsorted(g.ax[2], c[2])) for c, _ in p["metal"]})
    return meta


def make_phantom(
    seed: int,
    shape: Sequence[int] = (128, 128, 96),
    spacing_mm: Optional[Sequence[float]] = None,
    site: Union[PhantomSite, str, None] = None,
    hard: Optional[str] = None,
) -> Phantom:
    """Build one synthetic abdominal CT.

    seed: anatomy, noise and geometry are a pure function of (seed, shape, spacing, site, hard);
        the anatomy (in the reference body) depends on the seed alone, so the same seed under
        another site or hard case shows the same patient.
    shape: voxels (x, y, z).
    spacing_mm: voxel size in mm; default the site's.
    site: a :class:`PhantomSite` or a key of :data:`SITES`; default site "A" (portal phase).
    hard: None or one of :data:`HARD_CASES` or :data:`ORGAN_CASES`.

    Returns a :class:`Phantom` (image int16 HU, label uint8 SuPreM indices, RAS affine in mm).
    """
    site, shape, spacing = _checked_request(shape, spacing_mm, site, hard)
    seq = np.random.SeedSequence(int(seed))
    rng_anat, rng_hard, rng_geom, rng_noise = (np.random.default_rng(s) for s in seq.spawn(4))
    p = _apply_hard(_plan(rng_anat), hard, rng_hard)
    placement = _place_patient(shape, spacing, site, p, rng_geom)
    painter = _paint_anatomy(_warped_grid(shape, spacing, p, placement), p, site.phase)
    image, noise_sigma = _acquire(painter, site, spacing, rng_noise)
    affine = np.eye(4)
    affine[[0, 1, 2], [0, 1, 2]] = spacing
    affine[:3, 3] = placement.origin
    meta = _phantom_meta(seed, site, hard, spacing, shape, placement, noise_sigma, painter)
    return Phantom(image=image, label=painter.label, affine=affine, meta=meta)


# --------------------------------------------------------------------------------------------
# Files


def _atomic_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write NIfTI-1 .nii.gz via a temporary name in the same folder, then rename: a datastore
    watching the folder never sees a half-written study, and the temporary name does not end in
    .nii.gz so that it is not mistaken for one."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_open(path, "wb") as f:
        # mtime=0: identical phantoms give byte-identical files.
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=4, mtime=0) as gz:
            gz.write(img.to_bytes())


_DEFAULT_LABEL_DIR = os.path.join("labels", "final")


def write_phantom(
    phantom: Phantom,
    folder: str,
    name: str,
    label_dir: Optional[str] = _DEFAULT_LABEL_DIR,
) -> Tuple[str, Optional[str]]:
    """Write ``folder/name.nii.gz`` (int16 HU) and ``label_dir/name.nii.gz`` (uint8).

    label_dir: a relative path is taken under folder; the default ``labels/final`` is where a
        MONAI Label LocalDatastore looks for final labels. None: write no label.
    Returns (image_path, label_path or None).
    """
    image_path = os.path.join(folder, f"{name}.nii.gz")
    _atomic_nifti(np.asarray(phantom.image, np.int16), phantom.affine, image_path)
    label_path = None
    if label_dir is not None:
        label_folder = label_dir if os.path.isabs(label_dir) else os.path.join(folder, label_dir)
        label_path = os.path.join(label_folder, f"{name}.nii.gz")
        _atomic_nifti(np.asarray(phantom.label, np.uint8), phantom.affine, label_path)
    return image_path, label_path


def sample_seed(seed: int, index: int) -> int:
    """Seed of study ``index`` in a sample folder made with ``seed`` (distinct folders do not share studies)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def make_sample_studies(
    folder: str,
    n: int = 12,
    seed: int = 0,
    with_labels: bool = False,
    label_dir: Optional[str] = None,
    shape: Sequence[int] = (128, 128, 96),
    progress: bool = False,
) -> List[str]:
    """Fill folder with n phantoms ``phantom_000.nii.gz``... cycling through :data:`SITES`.

    Labels are written when with_labels is true or label_dir is given (default folder
    ``labels/final``, a relative label_dir is taken under folder). Studies whose files already
    exist are not rebuilt, so re-running is cheap. Returns the n image paths.
    """
    want_labels = with_labels or label_dir is not None
    ldir = None
    if want_labels:
        ldir = label_dir if label_dir is not None else _DEFAULT_LABEL_DIR
        ldir = ldir if os.path.isabs(ldir) else os.path.join(folder, ldir)
    os.makedirs(folder, exist_ok=True)
    site_names = sorted(SITES)
    indices = range(n)
    if progress:
        try:
            from tqdm import tqdm

            indices = tqdm(indices, desc="phantoms", unit="study")
        except ImportError:
            pass
    paths = []
    for i in indices:
        name = f"phantom_{i:03d}"
        image_path = os.path.join(folder, f"{name}.nii.gz")
        label_path = os.path.join(ldir, f"{name}.nii.gz") if ldir else None
        need_image = not os.path.exists(image_path)
        need_label = label_path is not None and not os.path.exists(label_path)
        if need_image or need_label:
            ph = make_phantom(sample_seed(seed, i), shape=shape, site=SITES[site_names[i % len(site_names)]])
            if need_image:
                _atomic_nifti(ph.image, ph.affine, image_path)
            if need_label:
                _atomic_nifti(ph.label, ph.affine, label_path)
        paths.append(image_path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testing.phantoms", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="study folder to fill (phantom_000.nii.gz, ...)")
    ap.add_argument("--n", type=int, default=12, help="number of studies (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--labels", metavar="DIR", default=None,
                    help="also write label maps here (relative to OUT_DIR; use labels/final for a MONAI Label datastore)")
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"),
                    help="voxels per study (default 128 128 96)")
    args = ap.parse_args(argv)
    paths = make_sample_studies(args.out_dir, n=args.n, seed=args.seed, label_dir=args.labels, shape=args.shape,
                                progress=True)
    print(f"{len(paths)} studies in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
