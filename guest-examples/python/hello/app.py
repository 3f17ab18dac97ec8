"""`hello` in Python: a greeting from wasi:config and a counter in wasi:keyvalue.

- `GET /py/hello` answers the manifest's `greeting` (or "Hello from Python"), the
  method, the path and the body's length;
- `POST /py/hello/count` increments `hits` in the `default` store and answers it.
"""

from lepton import config, http, kv
from lepton.http import IncomingHandler  # noqa: F401  (the component's export)


@http.handler
def hello(request: http.Request) -> http.Response:
    if request.path.endswith("/count"):
        return http.Response.text(200, f"{kv.Store.open('default').increment('hits')}\n")
    greeting = config.get("greeting") or "Hello from Python"
    return http.Response.text(
        200, f"{greeting} ({request.method} {request.path}, {len(request.body)} bytes)\n"
    )
