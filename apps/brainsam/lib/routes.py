"""Requests checked at the door, and the routes of kept label versions.

MONAI Label starts a train or scoring subprocess for any request and fails later inside it
(a train setting of the wrong type), or answers 500 (an unknown strategy). The routes here sit
ahead of MONAI Label's own for the same paths, with the same roles: they check names and
settings, answer 404 with the names that exist or 422 with what is wrong, and only then hand the
request to MONAI Label's own handler. They add two routes for the kept versions of a label
(lib.datastore): list them, and restore one.
"""

from dataclasses import asdict
from typing import Any, Callable, Dict, Mapping, Optional

from fastapi import Depends, FastAPI, HTTPException
from monailabel.config import settings
from monailabel.endpoints import activelearning, scoring, train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.datastore import StudiesDatastore

REQUEST_KEYS = ("model", "client_id")
"""Keys a train request may carry besides the train settings: MONAI Label's own."""

TrainCheck = Callable[[Dict[str, Any]], None]


def known(kind: str, name: str, names: Mapping[str, Any]) -> None:
    """404 naming the `kind`s there are, unless `name` is one of them."""
    if name not in names:
        raise HTTPException(404, f"no {kind} {name!r}; this server has: {', '.join(names) or 'none'}")


def checked_settings(model: str, params: Any, check: TrainCheck) -> Dict[str, Any]:
    """`params` of a train request for `model` once `check` accepted them; 422 with the reason."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise HTTPException(422, f"train settings must be a JSON object, got {params!r}")
    try:
        check({key: value for key, value in params.items() if key not in REQUEST_KEYS})
    except (KeyError, TypeError, ValueError) as error:
        reason = error.args[0] if error.args else error
        raise HTTPException(422, f"{model}: bad train setting, no run started: {reason}") from None
    return params


def install_checked_routes(app: FastAPI, instance: MONAILabelApp, checks: Mapping[str, TrainCheck]) -> None:
    """Put the checked routes ahead of MONAI Label's on the server's FastAPI `app`. checks:
    trainer name -> what raises for settings it refuses (the trainer's own check)."""
    admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
    annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
    user = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))

    async def train_model(
        model: str, params: Optional[dict] = None, run_sync: bool = False, enqueue: bool = False, _: User = admin
    ):
        known("trainer", model, checks)
        return train.run_model(model, checked_settings(model, params, checks[model]), run_sync, enqueue)

    async def train_all(params: Optional[dict] = None, run_sync: bool = False, _: User = admin):
        # MONAI Label merges the top-level keys into every model's request, and each model's own
        top = {k: v for k, v in (params or {}).items() if k not in checks}
        for model, check in checks.items():
            checked_settings(model, {**top, **((params or {}).get(model) or {})}, check)
        return train.run(params, run_sync)

    async def score(method: str, params: Optional[dict] = None, run_sync: bool = False, _: User = annotator):
        known("scoring method", method, instance._scoring_methods)
        return scoring.run_method(method, params, run_sync)

    async def next_sample(strategy: str, params: Optional[dict] = None, who: User = user):
        known("strategy", strategy, instance._strategies)
        return activelearning.sample(strategy, params, who.username)

    async def versions(image: str, tag: str = DefaultLabelTag.FINAL.value, _: User = user):
        store = local_datastore(instance)
        return {"image": image, "tag": tag, "versions": [asdict(v) for v in store.label_versions(image, tag)]}

    async def restore(image: str, version: str, tag: str = DefaultLabelTag.FINAL.value, _: User = annotator):
        store = local_datastore(instance)
        return {"image": image, "tag": tag, "label": store.restore_label(image, tag, version), "restored": version}

    routes = [
        ("/train/{model}", train_model, ["POST"]),
        ("/train/", train_all, ["POST"]),
        ("/scoring/{method}", score, ["POST"]),
        ("/activelearning/{strategy}", next_sample, ["POST"]),
        ("/datastore/label/versions", versions, ["GET"]),
        ("/datastore/label/restore", restore, ["PUT"]),
    ]
    for path, endpoint, methods in routes:
        app.add_api_route(path, endpoint, methods=methods, tags=["brainsam"])
        app.router.routes.insert(0, app.router.routes.pop())  # routes match in order: before MONAI Label's


def local_datastore(instance: MONAILabelApp) -> StudiesDatastore:
    """The server's studies folder datastore; 404 on a DICOMweb archive, which keeps every SEG itself."""
    store = instance.datastore()
    if not isinstance(store, StudiesDatastore):
        raise HTTPException(
            404, "label versions are kept by the local studies folder; a DICOMweb archive keeps every SEG stored to it"
        )
    return store
