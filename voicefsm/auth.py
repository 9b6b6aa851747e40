"""Who is on the other end of a client connection: pluggable authenticators, JWT by default.

An :class:`Authenticator` turns a bearer token into a :class:`Principal` or raises
:class:`AuthError`; the service closes the connection with 4401 before any upstream is opened.
Tokens arrive in the ``Sec-WebSocket-Protocol`` header (``bearer.<token>``), a ``token`` query
parameter, or a first ``{"type": "auth", "token": ...}`` message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import jwt


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user; sessions belong to one. ``roles`` come from the token (e.g.
    ``{"operator"}`` for the operator pages; a candidate's token has none)."""

    user_id: str
    roles: frozenset[str] = frozenset()


class AuthError(Exception):
    """The token is missing, invalid or expired; ``str(error)`` says which (no secrets)."""


MAX_USER_ID_LENGTH = 256
"""Longest ``sub`` accepted as a user id."""


def check_user_id(subject: object) -> str:
    """``subject`` as a user id, or :class:`AuthError`: a non-empty string of at most
    :data:`MAX_USER_ID_LENGTH` printable characters (so a user id cannot forge log lines)."""
    if not isinstance(subject, str) or not subject:
        raise AuthError("invalid token: the subject (sub) must be a non-empty string")
    if len(subject) > MAX_USER_ID_LENGTH:
        raise AuthError(f"invalid token: the subject is longer than {MAX_USER_ID_LENGTH}")
    if not subject.isprintable():
        raise AuthError("invalid token: the subject contains control characters")
    return subject


class Authenticator(Protocol):
    """Checks a bearer token (``None`` when the client sent none)."""

    async def authenticate(self, token: str | None) -> Principal:
        """The principal the token names; raise :class:`AuthError` otherwise."""
        ...


class JWTAuthenticator:
    """Validates JWTs with PyJWT: signature, ``exp`` (required), ``sub`` (the user id), and
    optionally audience and issuer.

    ``key`` is the HMAC secret or the public key for the chosen ``algorithms``.
    """

    def __init__(
        self,
        key: str | bytes,
        *,
        algorithms: Sequence[str] = ("HS256",),
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 5.0,
    ) -> None:
        if not key:
            raise ValueError("JWTAuthenticator needs a non-empty key")
        self._key = key
        self._algorithms = list(algorithms)
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_s

    async def authenticate(self, token: str | None) -> Principal:
        """Decode and verify ``token``."""
        if not token:
            raise AuthError("missing token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise AuthError("token expired") from error
        except jwt.InvalidTokenError as error:
            raise AuthError(f"invalid token: {error}") from error
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            # e.g. a token whose algorithm does not fit the configured key (RS256 vs HS256).
            raise AuthError(f"invalid token: {type(error).__name__}") from error
        claimed = claims.get("roles", claims.get("role", ()))
        roles = [claimed] if isinstance(claimed, str) else claimed
        if not isinstance(roles, list | tuple) or not all(isinstance(r, str) for r in roles):
            raise AuthError("invalid token: 'roles' must be a string or a list of strings")
        return Principal(user_id=check_user_id(claims["sub"]), roles=frozenset(roles))

    def issue(self, user_id: str, *, ttl_s: float = 3600, roles: Sequence[str] = ()) -> str:
        """Sign a token for ``user_id`` (for demos and tests; needs a symmetric algorithm)."""
        now = int(time.time())
        claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + int(ttl_s)}
        if roles:
            claims["roles"] = list(roles)
        if self._audience:
            claims["aud"] = self._audience
        if self._issuer:
            claims["iss"] = self._issuer
        return jwt.encode(claims, self._key, algorithm=self._algorithms[0])
