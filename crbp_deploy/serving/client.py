"""A small HTTP client for a served panoptic model: standard library only, keep-alive per client.

Used by `crbp-deploy predict --url`, the demo, the tests and the serving benchmark. A URL ending in
`/v2/models/NAME/infer` is a Triton model (package --format triton): the image goes as its UINT8 input
`IMAGE` in KServe v2's binary form, the budget as request parameters, and the answer is read back from
the `ANSWER` output (an error from Triton's `{"error": ...}`), so callers see the same `Answer`.
"""
from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import CrbpError, ServerError
from ..panoptic.encoding import decode_png
from ..panoptic.predict import Prediction

TOKEN_ENV = "CRBP_DEPLOY_TOKEN"
DEFAULT_MODEL = "crbp-panoptic"
V2_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
V2_HEADER = "Inference-Header-Content-Length"  # KServe v2 binary extension: JSON header, then raw tensor bytes


def sniff_content_type(data: bytes) -> str:
    """The image MIME type from the first bytes (what a browser or curl would send)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return "application/octet-stream"


def predictions_url(url: str, model: str | None = None) -> str:
    """`http://host:port` -> `http://host:port/predictions/<model>`; a full URL is kept as it is."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CrbpError(f"{url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080/predictions/{DEFAULT_MODEL})")
    if parts.path.strip("/") == "":
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/predictions/{model or DEFAULT_MODEL}", "", ""))
    return url


def find_token(url: str) -> str | None:
    """$CRBP_DEPLOY_TOKEN, else the inference key of a server `crbp-deploy serve` started here on that port
    (any engine of ENGINES: all keep TorchServe's key_file.json layout in their run folder)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return None
    from .engine import ENGINES, get_engine, read_keys

    for name in ENGINES:  # every engine keeps TorchServe's key file layout in its run folder
        key = read_keys(get_engine(name).default_run_dir(parts.port)).get("inference")
        if key:
            return key
    return None


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 200

    def prediction(self) -> Prediction:
        """The COCO panoptic result as a `Prediction` (id map decoded from the PNG)."""
        if not self.ok:
            raise ServerError(self.status, self.body)
        return to_prediction(self.body)


def to_prediction(body: dict[str, Any]) -> Prediction:
    try:
        pan_ids = decode_png(base64.b64decode(body["panoptic_png"], validate=True))
        residual = body["residual"]
        return Prediction(
            pan_ids=pan_ids,
            segments_info=body["segments_info"],
            iterations=int(body["iterations"]),
            residual=float("inf") if residual is None else float(residual),
            converged=bool(body["converged"]),
            diverged=bool(body.get("diverged", False)),
            timings_ms=dict(body.get("timings_ms") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CrbpError(f"the server's answer is not a panoptic prediction ({exc!r})") from None


class Client:
    """One keep-alive connection to one model endpoint; use one Client per thread."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 120.0):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CrbpError(f"{url!r} is not an http(s) URL")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = parts.path or "/"
        if parts.query:
            self._path += "?" + parts.query
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def post(self, data: bytes, *, content_type: str | None = None, headers: dict[str, str] | None = None,
             max_iters: int | None = None, tol: float | None = None) -> Answer:
        """POST one image; the budget goes in X-Max-Iters / X-Tol (TorchServe drops query strings
        on /predictions)."""
        sent = {"Content-Type": content_type or sniff_content_type(data)}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        if max_iters is not None:
            sent["X-Max-Iters"] = str(max_iters)
        if tol is not None:
            sent["X-Tol"] = repr(float(tol)) if isinstance(tol, float) and math.isfinite(tol) else str(tol)
        sent.update(headers or {})
        v2 = bool(V2_PATH.match(self._path.split("?")[0]))
        if v2:
            data, sent = v2_binary(data, sent)
        started = time.perf_counter()
        for attempt in (0, 1):  # a kept-alive connection the server closed is retried once, fresh
            try:
                conn = self._connection()
                conn.request("POST", self._path, body=data, headers=sent)
                response = conn.getresponse()
                raw = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
                self.close()
                if attempt or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    raise CrbpError(f"cannot reach {self.url}: {exc}") from None
        seconds = time.perf_counter() - started
        if v2:
            return Answer(response.status, v2_body(response.status, raw, response.getheader(V2_HEADER)), seconds)
        try:
            body = json.loads(raw.decode("utf-8"))
            if not isinstance(body, dict):
                body = {"message": str(body)}
        except (UnicodeDecodeError, ValueError):
            body = {"message": raw[:300].decode("utf-8", "replace")}
        return Answer(response.status, body, seconds)


def v2_binary(image: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary request carrying `image` as the UINT8 input IMAGE and asking for ANSWER in binary;
    budget headers stay headers (the Triton engine forwards them to the model as parameters)."""
    doc = {"inputs": [{"name": "IMAGE", "shape": [len(image)], "datatype": "UINT8",
                       "parameters": {"binary_data_size": len(image)}}],
           "outputs": [{"name": "ANSWER", "parameters": {"binary_data": True}}]}
    head = json.dumps(doc).encode("utf-8")
    sent = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    sent.update({"Content-Type": "application/octet-stream", V2_HEADER: str(len(head))})
    return head + image, sent


def v2_body(status: int, raw: bytes, header_length: str | None) -> dict[str, Any]:
    """The service's JSON body from a KServe v2 response: the ANSWER output's bytes, or for an error the
    JSON inside Triton's `{"error": ...}` (Triton's own errors become {"status", "message"})."""
    try:
        if header_length is not None:  # binary: JSON header, then the output bytes
            return json.loads(raw[int(header_length):].decode("utf-8"))
        doc = json.loads(raw.decode("utf-8"))
        if "outputs" in doc:
            return json.loads(bytes(doc["outputs"][0]["data"]).decode("utf-8"))
        message = str(doc.get("error", doc))
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError):
        return {"status": status, "message": raw[:300].decode("utf-8", "replace")}
    try:
        inner = json.loads(message)
        if isinstance(inner, dict) and "message" in inner:
            return inner
    except ValueError:
        pass
    return {"status": status, "message": message}
