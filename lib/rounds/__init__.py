"""Active-learning rounds: retrain on all final labels, re-score the unlabeled pool, re-rank.

``RoundManager`` decides when a round runs (label count, interval, on demand), keeps rounds from
overlapping across processes and records them in a ``RoundLog`` beside the datastore.
``python -m lib.rounds history STATE_DIR`` prints the log; ``python -m lib.rounds start`` asks a server.
"""

from lib.rounds.log import RoundLog  # noqa: F401
from lib.rounds.manager import RoundError, RoundManager, mean_dice  # noqa: F401
