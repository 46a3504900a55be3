"""Data shipped with the app: synthetic abdominal CT phantoms (no real scan may ship with the product).

Names are loaded from :mod:`lib.data.phantoms` on first use, so that ``python -m lib.data.phantoms``
does not import the module twice.
"""

from importlib import import_module
from typing import Any

__all__ = [
    "HARD_CASES",
    "PHASES",
    "SITES",
    "STRUCTURES",
    "Phantom",
    "PhantomSite",
    "make_phantom",
    "make_sample_studies",
    "organ_hu",
    "sample_seed",
    "write_phantom",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module(".phantoms", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
