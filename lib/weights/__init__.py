"""Where each backbone's weights come from: released files, downloads, starter and fine-tuned models."""

from .download import DownloadError, download_released  # noqa: F401
from .registry import RELEASED_FILES, HF_REPO, ModelWeights, WeightsRegistry, WeightsSource  # noqa: F401
