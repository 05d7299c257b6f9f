"""What the routes are given: a narrow port onto the gateway (not the server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from daemon.gateway.auth import Principal, TokenBook, bearer
from daemon.gateway.config import GatewayConfig
from daemon.gateway.errors import ApiError, unauthorized
from daemon.gateway.hub import Hub
from daemon.gateway.realm import GatewayRealm


@dataclass(frozen=True, slots=True)
class Ports:
    cfg: GatewayConfig
    realm: GatewayRealm
    hub: Hub
    tokens: TokenBook


def ports(request: Request) -> Ports:
    p: Ports = request.app.state.ports
    return p


def principal(request: Request) -> Principal:
    """The user of the request's ``Authorization: Bearer <API token>``."""
    token = bearer(request.headers.get("authorization"))
    if token is None:
        raise unauthorized("send Authorization: Bearer <API token>")
    who = ports(request).tokens.lookup(token)
    if who is None:
        raise unauthorized("invalid, revoked or banned API token")
    return who


def sysop(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.sysop:
        raise ApiError(403, "forbidden", "this needs the sysop role")
    return who


PortsDep = Annotated[Ports, Depends(ports)]
User = Annotated[Principal, Depends(principal)]
Sysop = Annotated[Principal, Depends(sysop)]
