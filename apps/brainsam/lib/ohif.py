"""OHIF's MONAI Label mode with what brainsam needs of it: saving, SEGs on the right slices, Next Sample's strategy.

The OHIF build in the monailabel 0.8.5 wheel (OHIF 3.10.0-beta.5, served at /ohif/) falls short
in its MONAI Label mode:
- it cannot save a segmentation: the panel's client has a `save_label` that no button calls,
  the mode declares OHIF's segmentation panel without showing it, and that panel's "Export
  DICOM SEG" runs the store command without the data source it needs (a TypeError);
- the SEG it exports is upside down: dcmjs stacks the referenced images from the highest
  position along the slice normal down, while the command hands it the labelmap slices in the
  viewer's volume order (lowest first), so every frame lands on the mirrored slice (the
  symptom of OHIF issues #5038 and #5183);
- Next Sample always asks for the `random` strategy: the strategy list calls an undefined
  `onChangeStrategy`.
The server answers the scripts concerned with the PATCHES lines changed; every other file is
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
    (
        "rightPanels: [monailabel.monaiLabel]",
        "rightPanels: [monailabel.monaiLabel, '@ohif/extension-cornerstone.panelModule.panelSegmentation']",
    ),
    # the panel's Export DICOM SEG: the store command with the data source it needs
    (
        "commandsManager.run('storeSegmentation', {\n        segmentationId\n      });",
        "commandsManager.run('storeSegmentation', {\n        segmentationId, dataSource: servicesManager._extensionManager.getActiveDataSource()[0]\n      });",
    ),
    # the SEG's frames: labelmap slices in dcmjs' order (highest position along the normal
    # first, as its Normalizer stacks the referenced images), so each frame keeps its slice
    (
        "const segImages = imageIds.map(imageId => esm.cache.getImage(imageId));",
        "const depth = image => { const { ImagePositionPatient: p, ImageOrientationPatient: o } = esm.metaData.get('instance', image.referencedImageId); "
        "return p[0] * (o[1] * o[5] - o[2] * o[4]) + p[1] * (o[2] * o[3] - o[0] * o[5]) + p[2] * (o[0] * o[4] - o[1] * o[3]); };\n"
        "      const segImages = imageIds.map(imageId => esm.cache.getImage(imageId)).sort((a, b) => depth(b) - depth(a));",
    ),
    # the Active Learning strategy list: the choice kept for Next Sample
    ("onChange: this.onChangeStrategy,", "onChange: event => this.setState({ strategy: event.target.value }),"),
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


def serve_fixed_ohif(app: FastAPI) -> bool:
    """Serve the changed scripts ahead of MONAI Label's /ohif/ route; return whether every
    change applied (else OHIF is served as it is, with a warning: another OHIF build)."""
    scripts = patched_scripts()
    changed = sum(new in text for text in scripts.values() for _, new in PATCHES)
    if changed != len(PATCHES):
        logger.warning("OHIF build in %s differs from the expected one: served unchanged (no saving from OHIF)", OHIF)
        return False
    for name, text in scripts.items():

        async def script(text: str = text) -> Response:
            return Response(text, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

        app.add_api_route(f"/ohif/{name}", script, methods=["GET"], include_in_schema=False)
        app.router.routes.insert(0, app.router.routes.pop())  # routes match in order: before /ohif/{path}
    logger.info(
        "OHIF: MONAI Label mode served with the segmentation panel, its Export DICOM SEG and Next Sample's strategy (%s)",
        ", ".join(scripts),
    )
    return True
