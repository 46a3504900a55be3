"""Turn failures inside a request into HTTP errors whose message names the problem.

MONAI Label has no exception handler of its own: an exception escaping a task becomes a bare
"Internal Server Error". These helpers map what went wrong to a status code and a readable detail,
and make sure a request can only name images the datastore holds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable, Dict

from fastapi import HTTPException

from lib.importance.failures import exception_chain
from lib.networks import CheckpointError
from lib.transforms.checks import InputError

logger = logging.getLogger(__name__)


def http_error(exc: BaseException, what: str) -> HTTPException:
    """Status and message for ``exc`` raised while doing ``what`` (e.g. "infer segresnet on 'ct1'")."""
    if isinstance(exc, HTTPException):
        return exc
    for e in exception_chain(exc):
        if isinstance(e, InputError):
            return HTTPException(status_code=422, detail=f"{what}: {e}")
        if isinstance(e, CheckpointError):
            return HTTPException(status_code=500, detail=f"{what}: model file problem: {e}")
    messages = [str(e) for e in exception_chain(exc) if str(e)]
    root = messages[-1] if messages else type(exc).__name__
    return HTTPException(status_code=500, detail=f"{what} failed: {root[:500]}")


def refuse_path_characters(value, what: str) -> str:
    """``value`` (an image id, a label tag) if it names no path; else HTTP 400 naming ``what``.

    MONAI Label joins these request values onto the studies folder: a ``../`` would read or write
    outside it.
    """
    if not isinstance(value, str) or not value:
        raise HTTPException(status_code=400, detail=f"no {what} given")
    if "/" in value or "\\" in value or value.startswith("..") or value == "." or "\0" in value:
        raise HTTPException(status_code=400, detail=f"{what} {value!r} holds path characters")
    return value


def checked_model(infers: Dict, model) -> str:
    """The request's infer model, if it is served; else HTTP 404 saying why it is not (e.g. its weights
    file was refused at start-up)."""
    task = infers.get(model) if isinstance(model, str) else None
    if task is None:
        raise HTTPException(status_code=404, detail=f"no model {model!r}; models served: {sorted(infers)}")
    if not task.is_valid():
        why = getattr(task, "why_unavailable", lambda: "")()
        raise HTTPException(status_code=404, detail=f"model {model!r} is not served: {why or 'no weights'}")
    return model


def checked_image(datastore, image) -> str:
    """The request's image, if the datastore holds it (or it is a file MONAI Label just uploaded).

    A request naming any other path (``../``, an absolute path) is refused: request values must not
    reach the file system unchecked.
    """
    if not isinstance(image, str) or not image:
        raise HTTPException(status_code=400, detail="no image id given")
    if os.path.isabs(image):
        tmp = os.path.realpath(tempfile.gettempdir())
        real = os.path.realpath(image)
        if real.startswith(tmp + os.sep) and os.path.isfile(real):
            return image  # an upload the endpoint stored in the temp folder
        raise HTTPException(status_code=400, detail=f"image {image!r} is not an image id of this datastore")
    refuse_path_characters(image, "image id")
    if not datastore.get_image_uri(image):
        raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
    return image


def guarded(fn: Callable, what: str, *args, **kwargs) -> Dict:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = http_error(e, what)
        logger.error(f"{err.status_code} {err.detail}", exc_info=err.status_code >= 500)
        raise err from e
