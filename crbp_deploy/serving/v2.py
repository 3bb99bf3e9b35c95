"""KServe's Open Inference Protocol v2, in one adapter beside the service: a v2 input carrying an
image (one BYTES element, base64) becomes a `RawRequest`; `v2_request` / `v2_answer` are the client side."""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping

from ..errors import InputError
from .service import RawRequest


def is_v2_input(row: Mapping[str, Any]) -> bool:
    return "datatype" in row and "name" in row


def from_v2_input(row: Mapping[str, Any], headers: Mapping[str, Any]) -> RawRequest:
    """One v2 input (as the kservev2 envelope hands it over) -> RawRequest; an unusable one carries its error."""
    if row.get("datatype") != "BYTES" or not isinstance(row.get("data"), str):
        return RawRequest({}, {}, headers, error=(
            f"v2 input {row.get('name')!r} has datatype {row.get('datatype')}; send the image file as one "
            "BYTES element, base64-encoded"))
    try:
        data = base64.b64decode(row["data"], validate=True)
    except (binascii.Error, ValueError):
        return RawRequest({}, {}, headers, error=f"v2 input {row.get('name')!r} is not valid base64")
    return RawRequest({"body": data}, {"body": ""}, headers)


def v2_request(image: bytes, name: str = "image") -> dict[str, Any]:
    """An Open Inference Protocol v2 request carrying one image as a base64 BYTES input."""
    return {"inputs": [{"name": name, "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode("ascii")]}]}


def v2_answer(response: dict[str, Any]) -> dict[str, Any]:
    """The panoptic JSON inside a v2 response (the first output's first BYTES element)."""
    try:
        return json.loads(response["outputs"][0]["data"][0])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"not a v2 response carrying a crbp-deploy answer ({exc!r})") from None
