import logging
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (os.path.dirname(HERE), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(autouse=True)
def _logging_switched_back_on():
    """The bench scripts' mains switch warnings off process-wide (``logging.disable``) when a test runs
    them in-process; later tests must still see what the code logs."""
    yield
    logging.disable(logging.NOTSET)
