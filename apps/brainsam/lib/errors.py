"""4xx answers for bad requests that MONAI Label's own endpoints would answer with a 500.

Its endpoints parse `params` with json.loads and let the datastore's not-found exceptions
escape; handlers registered here turn them into 400 and 404 with what to fix.
"""

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
)


async def bad_json(request: Request, error: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"params is not valid JSON ({error}): send a JSON object"}, status_code=400)


async def not_found(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on the running server's FastAPI `app`."""
    app.add_exception_handler(json.JSONDecodeError, bad_json)
    app.add_exception_handler(ImageNotFoundException, not_found)
    app.add_exception_handler(LabelNotFoundException, not_found)
    # the server built its middleware (which copies the handlers) before the app was created:
    # dropping it makes the next request build it again, with these handlers
    app.middleware_stack = None
