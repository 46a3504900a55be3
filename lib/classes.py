"""The one source of truth for class tables.

Every class index used anywhere in the project is an index into ``SUPREM_CLASSES``, the order of the
released SuPreM output channels (index = channel + 1, 0 = background). Other orders (AbdomenAtlas 1.1
label files, TotalSegmentator ids) are mappings into it, defined here and nowhere else.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

# Released 32-channel order: channel c predicts class c + 1.
SUPREM_CLASSES: List[str] = [
    "spleen",
    "kidney_right",
    "kidney_left",
    "gall_bladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "postcava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "duodenum",
    "hepatic_vessel",
    "lung_right",
    "lung_left",
    "colon",
    "intestine",
    "rectum",
    "bladder",
    "prostate",
    "femur_left",
    "femur_right",
    "celiac_trunk",
    "kidney_tumor",
    "liver_tumor",
    "pancreas_tumor",
    "hepatic_vessel_tumor",
    "lung_tumor",
    "colon_tumor",
    "kidney_cyst",
]
CLASS_INDEX: Dict[str, int] = {name: i + 1 for i, name in enumerate(SUPREM_CLASSES)}

# Label sets offered by the app (`--conf labels ...`), as names in SuPreM order.
LABEL_SETS: Dict[str, List[str]] = {
    # AbdomenAtlas 1.1: the 25 anatomical structures 1..25.
    "atlas25": SUPREM_CLASSES[:25],
    # AbdomenAtlas 1.0: the 9 organs SuPreM's direct inference saves.
    "atlas9": [
        "spleen",
        "kidney_right",
        "kidney_left",
        "gall_bladder",
        "liver",
        "stomach",
        "aorta",
        "postcava",
        "pancreas",
    ],
    "all32": list(SUPREM_CLASSES),
}
DEFAULT_LABEL_SET = "atlas25"

# Vessels are excluded as "other organs" when the importance score looks for overlaps.
VESSELS = ("aorta", "postcava", "portal_vein_and_splenic_vein", "hepatic_vessel", "celiac_trunk")
OVERLAP_ORGANS: List[str] = [n for n in SUPREM_CLASSES[:25] if n not in VESSELS]  # 20 organs

# AbdomenAtlas 1.1 label files number the 25 structures alphabetically-ish, in this order (1-based).
ATLAS11_FILE_ORDER: List[str] = [
    "aorta",
    "gall_bladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "postcava",
    "spleen",
    "stomach",
    "adrenal_gland_left",
    "adrenal_gland_right",
    "bladder",
    "celiac_trunk",
    "colon",
    "duodenum",
    "esophagus",
    "femur_left",
    "femur_right",
    "hepatic_vessel",
    "intestine",
    "lung_left",
    "lung_right",
    "portal_vein_and_splenic_vein",
    "prostate",
    "rectum",
]

# TotalSegmentator v2 "total" ids -> SuPreM class names (ids without a SuPreM class are dropped).
TOTALSEG_TO_SUPREM: Dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gall_bladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    10: "lung_left",
    11: "lung_left",
    12: "lung_right",
    13: "lung_right",
    14: "lung_right",
    15: "esophagus",
    18: "intestine",
    19: "duodenum",
    20: "colon",
    21: "bladder",
    22: "prostate",
    52: "aorta",
    63: "postcava",
    64: "portal_vein_and_splenic_vein",
    75: "femur_left",
    76: "femur_right",
}

LABEL_MAPS: Dict[str, Dict[int, str]] = {
    "suprem": {i + 1: n for i, n in enumerate(SUPREM_CLASSES)},
    "atlas11": {i + 1: n for i, n in enumerate(ATLAS11_FILE_ORDER)},
    "totalseg": TOTALSEG_TO_SUPREM,
}


def label_set(name: str) -> List[str]:
    """Names of a label set (``atlas25``, ``atlas9``, ``all32``); ValueError naming the choices."""
    try:
        return list(LABEL_SETS[name])
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; choose one of {', '.join(LABEL_SETS)}") from None


def label_dict(names: Sequence[str]) -> Dict[str, int]:
    """``{name: SuPreM class index}`` for the given names, in SuPreM order (what /info/ shows)."""
    return {n: CLASS_INDEX[n] for n in SUPREM_CLASSES if n in set(names)}


def mapping_lut(source: Mapping[int, str], max_id: int = 255) -> List[int]:
    """Look-up table ``lut[source_id] = SuPreM index`` (0 where the id has no SuPreM class)."""
    lut = [0] * (max(max_id, max(source, default=0)) + 1)
    for src, name in source.items():
        lut[src] = CLASS_INDEX[name]
    return lut
