"""OHIF's MONAI Label mode with OHIF's segmentation panel beside the MONAI Label panel.

The OHIF build in the monailabel 0.8.5 wheel (served at /ohif/) has no way to save a
segmentation in its MONAI Label mode: the panel's client has a `save_label` that no button
calls, and the mode declares OHIF's segmentation panel (whose "Export DICOM SEG" stores the
segmentation in the archive through STOW-RS) without showing it. The server here answers the
mode's script with that panel added to the right-hand panels; every other file is served as
MONAI Label serves it. Saved SEGs become final labels (lib.dicomweb).
"""

import logging
from pathlib import Path
from typing import Optional

import monailabel
from fastapi import FastAPI
from fastapi.responses import Response

logger = logging.getLogger(__name__)

OHIF = Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif"
PANELS = "rightPanels: [monailabel.monaiLabel]"
WITH_SEGMENTATION = "rightPanels: [monailabel.monaiLabel, '@ohif/extension-cornerstone.panelModule.panelSegmentation']"
"""The panel without its tool box: the mode defines no brush buttons for one, which breaks it."""


def mode_script(folder: Path = OHIF) -> Optional[tuple[str, str]]:
    """(file name, patched text) of the MONAI Label mode's script in the OHIF build, or None
    when no script shows the panels as expected (another OHIF build)."""
    for path in sorted(folder.glob("*.bundle.*.js")):
        text = path.read_text(encoding="utf-8")
        if "routeName: 'monai-label'" in text and text.count(PANELS) == 1:
            return path.name, text.replace(PANELS, WITH_SEGMENTATION)
    return None


def show_segmentation_panel(app: FastAPI) -> None:
    """Serve the patched mode script ahead of MONAI Label's /ohif/ route (logs and leaves OHIF
    as it is when this OHIF build differs)."""
    found = mode_script()
    if found is None:
        logger.warning("OHIF's MONAI Label mode script not found in %s: OHIF is served without the segmentation panel (no saving)", OHIF)
        return
    name, text = found

    async def patched() -> Response:
        return Response(text, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

    app.add_api_route(f"/ohif/{name}", patched, methods=["GET"], include_in_schema=False)
    app.router.routes.insert(0, app.router.routes.pop())  # routes match in order: before /ohif/{path}
    logger.info("OHIF: MONAI Label mode served with the segmentation panel (%s)", name)
