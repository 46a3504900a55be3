"""Datastore adapters: MONAI Label's local datastore with label checks before anything is written."""

from .checked import CheckedLocalDatastore, LabelError, check_label, info_reader, labeled_images_now  # noqa: F401
from .ranking import ranked_pool  # noqa: F401
