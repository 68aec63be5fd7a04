"""Optional bearer token (``MEMETRACE_API_TOKEN``) for ``/v1/*`` and ``/gallery``.

Browsers cannot add a header to ``<img src>``: ``GET /gallery?token=...`` stores the token in an
HttpOnly, SameSite=Strict cookie, which GET requests may present instead of the header. Writes
(``POST /v1/search``) need the header, so a cookie alone cannot be abused cross-site.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from memetrace.api.errors import ApiError

COOKIE = "memetrace_token"
bearer_scheme = HTTPBearer(auto_error=False, description="the value of MEMETRACE_API_TOKEN")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


class TokenCheck:
    def __init__(self, token: SecretStr | None) -> None:
        self._token = token.get_secret_value().encode() if token else b""  # empty = no auth

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def require(self, request: Request, creds: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 unless the request carries the token (header, or cookie on GET/HEAD)."""
        if not self.enabled:
            return
        given = creds.credentials if creds else None
        if given is None and request.method in ("GET", "HEAD"):
            given = request.cookies.get(COOKIE)
        if given is None:
            raise ApiError(401, "unauthorized", "this API requires a token: send the header "
                           "`Authorization: Bearer <MEMETRACE_API_TOKEN>` (browsers: open /gallery?token=...)",
                           {"WWW-Authenticate": "Bearer"})
        if not self.matches(given):
            raise ApiError(401, "unauthorized", "the token does not match MEMETRACE_API_TOKEN",
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def dependency(self) -> Callable[..., None]:
        """The FastAPI dependency (it also puts the bearer scheme in the OpenAPI docs)."""

        def require_token(request: Request, creds: BearerCredentials) -> None:
            self.require(request, creds)

        return require_token
