"""Write Lepton functions in Python.

A function is a module that defines an HTTP handler with :func:`lepton.http.handler`
and re-exports :class:`lepton.http.IncomingHandler` (the class componentize-py looks
for). Built with componentize-py against the ``lepton:function/python-guest`` world
(``lepton build``), it is a standard ``wasi:http`` component: inference through
``wasi:nn`` (:mod:`lepton.nn`), training through ``lepton:nn/training``
(:mod:`lepton.train`), key-value stores through ``wasi:keyvalue`` (:mod:`lepton.kv`)
and configuration through ``wasi:config`` (:mod:`lepton.config`).

Example::

    from lepton import http
    from lepton.http import IncomingHandler  # noqa: F401  (the component's export)

    @http.handler
    def hello(request: http.Request) -> http.Response:
        return http.Response.text(200, "Hello from Python\\n")
"""

__all__ = ["config", "http", "kv", "nn", "train"]
