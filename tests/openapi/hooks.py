"""Schemathesis hooks for tests/openapi.rs.

Two rules of the API are cross-field (or inside one string) and so cannot be said in
JSON Schema; docs/openapi.json says them in words:

- a conversation id `dm:A:B` needs A < B in byte order (so A != B);
- `POST /api/messages` with `to` needs `to` != `from`.

A request that breaks one of them is rightly refused with 400 `invalid`, which the
`positive_data_acceptance` check would count as a schema-valid request rejected. So
schema-valid cases that break them are not generated; negative cases (which must be
refused anyway) and every check stay as they are.
"""

import re
from urllib.parse import unquote

import schemathesis

_DM = re.compile(r"dm:([A-Za-z0-9_.-]{1,64}):([A-Za-z0-9_.-]{1,64})\Z")


def _bad_dm(conv):
    """A well-formed `dm:A:B` whose A is not below B (byte order: these ids are ASCII)."""
    # Path parameters reach the hooks percent-encoded already (`dm%3Aa%3Ab`).
    m = _DM.match(unquote(conv)) if isinstance(conv, str) else None
    return bool(m) and not m.group(1) < m.group(2)


@schemathesis.hook
def filter_case(context, case):
    meta = case.meta
    if meta is not None and not meta.generation.mode.is_positive:
        return True
    method = case.operation.method.upper()
    path = case.operation.path
    if method == "GET" and path == "/api/history":
        return not _bad_dm((case.query or {}).get("conv"))
    if method == "DELETE" and path == "/api/messages/{conv}/{seq}":
        return not _bad_dm((case.path_parameters or {}).get("conv"))
    if method == "POST" and path == "/api/messages":
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("to"), str):
            return body.get("to") != body.get("from")
    return True
