"""The OHIF viewer MONAI Label serves at /ohif/, with the app's revision mode added (``revision_mode.js``).

MONAI Label serves its OHIF build's files as they are; the app answers one of them itself, the
``app-config.js`` that OHIF reads first: MONAI Label's own file (its data source, the server's
/proxy/dicom), followed by the mode, so that ``/ohif/suprem?StudyInstanceUIDs=...`` opens a study with
MONAI Label's panel, OHIF's brush tools and its segmentation panel (Export DICOM SEG) side by side.
"""

from __future__ import annotations

import os

REVISION_ROUTE = "suprem"  # /ohif/suprem?StudyInstanceUIDs=...: the mode's address (revision_mode.js)
_MODE_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "revision_mode.js")


def monailabel_app_config() -> str:
    """The path of the app-config.js of the OHIF build MONAI Label bundles."""
    import monailabel.endpoints.ohif as ohif_endpoint

    return os.path.join(os.path.dirname(os.path.abspath(ohif_endpoint.__file__)), "static", "ohif", "app-config.js")


def app_config_js() -> str:
    """MONAI Label's OHIF app-config.js with the revision mode appended."""
    with open(monailabel_app_config(), encoding="utf-8") as f:
        config = f.read()
    with open(_MODE_JS, encoding="utf-8") as f:
        mode = f.read()
    return f"{config}\n\n{mode}"


def serve_revision_mode(fastapi_app) -> None:
    """Answers ``/ohif/app-config.js`` on ``fastapi_app`` (MONAI Label's server) with ``app_config_js()``,
    ahead of MONAI Label's route for the rest of /ohif/ (the first route that matches answers), behind the
    same authorisation as that route. Called once by the server process."""
    from fastapi import Depends
    from fastapi.responses import Response
    from fastapi.routing import APIRoute
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC

    path = f"{settings.MONAI_LABEL_API_STR}/ohif/app-config.js"
    if any(getattr(r, "path", None) == path for r in fastapi_app.router.routes):
        return

    body = app_config_js()  # both files are fixed for the life of the server: read once, not per page load

    def get_app_config():
        return Response(body, media_type="application/javascript")

    route = APIRoute(
        path,
        get_app_config,
        methods=["GET"],
        include_in_schema=False,
        dependencies=[Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))],
    )
    fastapi_app.router.routes.insert(0, route)
