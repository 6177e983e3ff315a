"""OHIF's MONAI Label mode able to save: OHIF's segmentation panel beside the MONAI Label panel.

The OHIF build in the monailabel 0.8.5 wheel (OHIF 3.10.0-beta.5, served at /ohif/) cannot save a
segmentation in its MONAI Label mode: the panel's client has a `save_label` that no button
calls, the mode declares OHIF's segmentation panel without showing it, and that panel's
"Export DICOM SEG" runs the store command without the data source it needs (a TypeError). The
server here answers the two scripts concerned with those two lines changed; every other file is
served as MONAI Label serves it. A SEG exported this way goes to the archive through MONAI
Label's DICOMweb proxy (STOW-RS) and becomes the series' final label (lib.dicomweb).
"""

import logging
from pathlib import Path

import monailabel
from fastapi import FastAPI
from fastapi.responses import Response

logger = logging.getLogger(__name__)

OHIF = Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif"
PATCHES = (
    # the mode's right-hand panels: the segmentation panel without its tool box (the mode
    # defines no brush buttons for one, which breaks it)
    ("rightPanels: [monailabel.monaiLabel]", "rightPanels: [monailabel.monaiLabel, '@ohif/extension-cornerstone.panelModule.panelSegmentation']"),
    # the panel's Export DICOM SEG: the store command with the data source it needs
    (
        "commandsManager.run('storeSegmentation', {\n        segmentationId\n      });",
        "commandsManager.run('storeSegmentation', {\n        segmentationId, dataSource: servicesManager._extensionManager.getActiveDataSource()[0]\n      });",
    ),
)


def patched_scripts(folder: Path = OHIF) -> dict[str, str]:
    """File name -> changed text of the OHIF scripts that hold a PATCHES line (once each)."""
    scripts: dict[str, str] = {}
    for path in sorted(folder.glob("*.bundle.*.js")):
        text = path.read_text(encoding="utf-8")
        for old, new in PATCHES:
            if text.count(old) == 1:
                scripts[path.name] = text = text.replace(old, new)
    return scripts


def enable_saving(app: FastAPI) -> bool:
    """Serve the changed scripts ahead of MONAI Label's /ohif/ route; return whether every
    change applied (else OHIF is served as it is, with a warning: another OHIF build)."""
    scripts = patched_scripts()
    changed = sum(new in text for text in scripts.values() for _, new in PATCHES)
    if changed != len(PATCHES):
        logger.warning("OHIF build in %s differs from the expected one: served unchanged, without saving from OHIF", OHIF)
        return False
    for name, text in scripts.items():

        async def script(text: str = text) -> Response:
            return Response(text, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

        app.add_api_route(f"/ohif/{name}", script, methods=["GET"], include_in_schema=False)
        app.router.routes.insert(0, app.router.routes.pop())  # routes match in order: before /ohif/{path}
    logger.info("OHIF: MONAI Label mode served with the segmentation panel and its Export DICOM SEG (%s)", ", ".join(scripts))
    return True
