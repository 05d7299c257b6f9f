"""Sysop administration over ``orchestrator/admin`` (request/response).

Read-only views (``tasks``, ``stats``, ``peers``) are open to any known
identity; everything else needs a sysop token.  On first start a ``sysop``
user is created and its token written to ``<state_dir>/sysop.token`` (0600),
which ``mtor admin`` on the same machine reads.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Final

from daemon import topics
from daemon.bus import Inbound
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.protocol.admin import AdminReply, AdminRequest

if TYPE_CHECKING:
    from daemon.orchestrator.service import Orchestrator

log = logging.getLogger(__name__)

OPEN_OPS: Final = frozenset({"tasks", "stats", "peers"})


class AdminError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Admin:
    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch

    @property
    def token_file(self) -> Any:
        return self.orch.cfg.state_dir / "sysop.token"

    async def bootstrap_sysop(self) -> None:
        users = self.orch.users
        if any(u["role"] == "sysop" for u in users.all()):
            return
        token = await users.add("sysop", "sysop")
        path = self.token_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("created the sysop user; its token is in %s", path)

    async def on_request(self, msg: Inbound) -> None:
        reply_topic = msg.response_topic
        correlation: str | None = None
        try:
            req = decode(msg.payload, AdminRequest)
            correlation = req.correlation
            reply_topic = reply_topic or req.reply_to
            result = await self.handle(req)
            reply = AdminReply(ok=True, result=result, correlation=correlation)
        except MessageError as exc:
            log.warning("bad admin request: %s (%s)", exc, msg.preview())
            reply = AdminReply(ok=False, error=str(exc), code=exc.code)
        except AdminError as exc:
            log.warning("admin request refused: %s", exc)
            reply = AdminReply(ok=False, error=str(exc), code=exc.code, correlation=correlation)
        except (ValueError, TypeError) as exc:
            reply = AdminReply(
                ok=False, error=f"bad arguments: {exc}", code="bad_request", correlation=correlation
            )
        except Exception as exc:
            log.exception("admin request failed")
            reply = AdminReply(
                ok=False,
                error=f"internal error: {type(exc).__name__}",
                code="internal",
                correlation=correlation,
            )
        if topics.valid_reply_topic(reply_topic):
            self.orch.bus.post(reply_topic, reply, correlation_data=msg.correlation_data)

    def _authorise(self, req: AdminRequest) -> str:
        from daemon.orchestrator.service import Refused

        try:
            name, role = self.orch.identify(req.user, req.token)
        except Refused as exc:
            raise AdminError(exc.code, str(exc)) from exc
        if req.op not in OPEN_OPS and role != "sysop":
            raise AdminError("forbidden", f"'{req.op}' needs a sysop token")
        return name

    async def handle(self, req: AdminRequest) -> Any:
        self._authorise(req)
        orch = self.orch
        a = req.args
        op = req.op
        if op == "stats":
            return orch.snapshot().model_dump(mode="json")
        if op == "peers":
            return orch.snapshot().peers
        if op == "tasks":
            return [
                {
                    "task_id": t.id,
                    "capability": t.capability,
                    "user": t.user,
                    "priority": t.submit.priority,
                    "state": t.state,
                    "node": t.node,
                    "attempt": t.attempt,
                    "age_s": round(time.time() - t.submitted, 3),
                }
                for t in orch.tasks.values()
            ]
        if op == "history":
            return await orch.store.history(
                int(a.get("limit", 50)), a.get("user"), a.get("capability")
            )
        if op == "users":
            return orch.users.all()
        if op == "user_add":
            role = a.get("role", "user")
            if role not in ("sysop", "user", "guest", "device"):
                raise AdminError("bad_request", f"unknown role {role!r}")
            return {"name": _name(a), "role": role, "token": await orch.users.add(_name(a), role)}
        if op == "user_remove":
            return {"removed": await orch.users.remove(_name(a))}
        if op in ("ban", "unban"):
            await orch.users.set_ban(_name(a), op == "ban", a.get("reason"))
            return {"name": _name(a), "banned": op == "ban"}
        if op in ("drain", "undrain", "blacklist", "unblacklist"):
            return self._peer_op(op, str(a.get("node", "")))
        if op == "cancel":
            task_id = str(a.get("task_id", ""))
            ok = orch.cancel(
                task_id, None, None, a.get("reason") or "cancelled by sysop", sysop=True
            )
            if not ok:
                raise AdminError("not_found", f"no active task {task_id!r}")
            return {"cancelled": task_id}
        raise AdminError("bad_request", f"unknown op {op!r}")

    def _peer_op(self, op: str, node_id: str) -> dict[str, Any]:
        orch = self.orch
        peer = orch.registry.peers.get(node_id)
        if peer is None:
            raise AdminError("not_found", f"no peer {node_id!r}")
        if op in ("drain", "undrain"):
            peer.drained = op == "drain"
        else:
            peer.blacklisted = op == "blacklist"
        for name in peer.slots:
            orch.registry.refresh(peer, name)
            orch._dispatch(name)
        log.info("sysop: %s %s", op, node_id)
        return {"node": node_id, "drained": peer.drained, "blacklisted": peer.blacklisted}


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise AdminError("bad_request", "'name' must be a non-empty string")
    return name
