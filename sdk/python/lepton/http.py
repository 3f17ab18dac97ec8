"""HTTP handlers over ``wasi:http/incoming-handler``, with plain request and response
objects: the body is read in full before the handler runs and written in full after.
"""

from __future__ import annotations

import json as _json
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import streams, types

# What one read or write moves through a stream at most (the host takes 4 KiB writes).
_CHUNK = 4096

_METHODS = {
    types.Method_Get: "GET",
    types.Method_Head: "HEAD",
    types.Method_Post: "POST",
    types.Method_Put: "PUT",
    types.Method_Delete: "DELETE",
    types.Method_Connect: "CONNECT",
    types.Method_Options: "OPTIONS",
    types.Method_Trace: "TRACE",
    types.Method_Patch: "PATCH",
}


@dataclass
class Request:
    """An incoming request, its body read in full."""

    method: str
    path: str
    query: str
    headers: List[Tuple[str, bytes]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """The first value of the header `name` (any case), as text."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    def params(self) -> Dict[str, str]:
        """The query's parameters (the last value of each)."""
        return dict(parse_qsl(self.query, keep_blank_values=True))


@dataclass
class Response:
    """The response a handler returns."""

    status: int = 200
    headers: List[Tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def text(cls, status: int, text: str) -> "Response":
        """A ``text/plain; charset=utf-8`` response."""
        return cls(status, [("content-type", b"text/plain; charset=utf-8")], text.encode())

    @classmethod
    def json(cls, status: int, value: object) -> "Response":
        """An ``application/json`` response of `value`."""
        body = _json.dumps(value, separators=(",", ":")).encode()
        return cls(status, [("content-type", b"application/json")], body)


_handler: Optional[Callable[[Request], Response]] = None


def handler(function: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Makes `function` the component's HTTP handler (one per component)."""
    global _handler
    _handler = function
    return function


def _read(incoming: types.IncomingRequest) -> Request:
    method = incoming.method()
    name = _METHODS.get(type(method))
    if name is None:
        name = method.value  # Method_Other
    target = urlsplit(incoming.path_with_query() or "/")
    headers = incoming.headers().entries()
    body = incoming.consume()
    stream = body.stream()
    chunks = []
    try:
        while True:
            try:
                chunks.append(stream.blocking_read(_CHUNK * 16))
            except Err as error:
                if isinstance(error.value, streams.StreamError_Closed):
                    break
                raise
    finally:
        stream.__exit__(None, None, None)
    types.IncomingBody.finish(body)
    return Request(name, target.path or "/", target.query, headers, b"".join(chunks))


def _write(response: Response, out: types.ResponseOutparam) -> None:
    outgoing = types.OutgoingResponse(types.Fields.from_list(list(response.headers)))
    outgoing.set_status_code(response.status)
    body = outgoing.body()
    types.ResponseOutparam.set(out, Ok(outgoing))
    stream = body.write()
    try:
        data = memoryview(response.body)
        for start in range(0, len(data), _CHUNK):
            stream.blocking_write_and_flush(bytes(data[start : start + _CHUNK]))
    finally:
        stream.__exit__(None, None, None)
    types.OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    """The component's ``wasi:http/incoming-handler`` export: re-export it from the
    app module (``from lepton.http import IncomingHandler``)."""

    def handle(self, request: types.IncomingRequest, response_out: types.ResponseOutparam) -> None:
        if _handler is None:
            _write(Response.text(500, "no handler: decorate one with @lepton.http.handler\n"), response_out)
            return
        try:
            answer = _handler(_read(request))
        except Exception as error:  # the guest's bug: a 500, and the reason on stderr
            # (imported at the top: componentize-py bundles only what is imported)
            traceback.print_exc(file=sys.stderr)
            answer = Response.text(500, f"the function failed: {type(error).__name__}\n")
        _write(answer, response_out)
