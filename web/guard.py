"""Who may use the HTTP routes that carry live streams: the same rules as the WebSocket stream (the app's own
pages and allowed origins; scripts from this computer; with a token set, whoever presents it)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from .access import logged_in


def refusal_response(broadcaster, request: Request, access=None, app=None) -> JSONResponse | None:
    """A 403 saying why, or None when the request may go on. With a login (--auth), the login cookie stands for the
    token."""
    token = request.query_params.get("token") or _bearer(request.headers.get("authorization"))
    if token is None and access is not None and access.token and logged_in(app, request):
        token = access.token
    reason = broadcaster.refusal(request.headers.get("origin"), request.client.host if request.client else None,
                                 token, request.headers.get("host"))
    return None if reason is None else JSONResponse({"error": reason}, status_code=403)


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None
