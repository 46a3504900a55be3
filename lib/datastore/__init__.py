"""Datastore adapters: MONAI Label's local datastore with label checks before anything is written, organ-level
revision records, and the ranking of the pool."""

from .checked import CheckedLocalDatastore, LabelError, check_label, info_reader, labeled_images_now  # noqa: F401
from .ranking import fully_revised_now, partly_revised, pool_images, ranked_pool, revised_organs, revision_progress  # noqa: F401,E501
from .revisions import RevisionError, requested_organs  # noqa: F401
