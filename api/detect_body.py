"""The body of ``/detect``: an image as a multipart form (field ``file``) or as JSON (``{"image": base64}``).

FastAPI cannot declare "either a form or JSON" for one route, so the route reads the request itself with
:func:`read_detect_body` and documents both forms with :data:`DETECT_OPENAPI`. Both forms are validated by
the same pydantic model (``schemas.DetectJSON``) and refused with the same error bodies.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile as FormFile
from starlette.formparsers import MultiPartException

from api import schemas
from api.errors import APIError, invalid_request

DETECT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the image file"},
                        "model": {"type": "string", "description": "model id (only for /detect)"},
                        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            },
            "application/json": {
                "schema": schemas.DetectJSON.model_json_schema(),
                "example": {"image": schemas.TINY_PNG_B64, "score_threshold": 0.3},
            },
        },
    }
}


@dataclass(frozen=True)
class DetectBody:
    image: bytes  # the image file's bytes, not decoded yet
    model: str | None
    score_threshold: float | None


async def read_detect_body(request: Request) -> DetectBody:
    """The image bytes and options of a multipart form or a JSON body; ``APIError`` 400/415/422 otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _from_form(request)
    if ctype == "application/json" or ctype.endswith("+json"):
        return await _from_json(request)
    raise APIError(
        415,
        "unsupported_media_type",
        "send the image as multipart/form-data (field 'file') or as JSON {\"image\": base64}",
    )


async def _from_form(request: Request) -> DetectBody:
    try:
        form = await request.form(max_files=1, max_fields=10)
    except MultiPartException as e:
        raise APIError(400, "bad_request", f"cannot parse the form: {e.message}") from e
    upload = form.get("file")
    if not isinstance(upload, FormFile):
        raise APIError(422, "invalid_request", "file: an image file is required (form field 'file')")
    data = await upload.read()
    model, threshold = form.get("model"), form.get("score_threshold")
    try:
        # The image is the form's file; the JSON model checks the other fields the same way for both forms.
        fields = schemas.DetectJSON.model_validate(
            {"image": "", "model": model if isinstance(model, str) and model else None,
             "score_threshold": threshold if isinstance(threshold, str) and threshold else None}
        )  # fmt: skip
    except ValidationError as e:
        raise invalid_request(e) from e
    return DetectBody(data, fields.model, fields.score_threshold)


async def _from_json(request: Request) -> DetectBody:
    raw = await request.body()
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, "malformed_json", f"the request body is not valid JSON: {e}") from e
    try:
        body = schemas.DetectJSON.model_validate(payload)
    except ValidationError as e:
        raise invalid_request(e) from e
    try:
        data = base64.b64decode(body.image, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, "bad_image", f"image: not valid base64 ({e})") from e
    return DetectBody(data, body.model, body.score_threshold)
