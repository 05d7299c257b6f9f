"""Sysop administration over ``orchestrator/admin/<account>`` (request/response).

Read-only views (``tasks``, ``stats``, ``peers``) are open to any known
identity; everything else needs the sysop role: a broker account with role
sysop (``mtor broker``), or on a broker the realm did not configure, a sysop
API token.  On first start a ``sysop`` user is created and its token written
to ``<state_dir>/sysop.token`` (0600), which ``mtor admin`` on the same
machine reads.  Answers go only to the requester's own ``reply/<account>/...``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from daemon import topics
from daemon.bus import Inbound
from daemon.config import SECRET_KEYS
from daemon.errors import MessageError
from daemon.messages import Message, decode
from daemon.orchestrator.admission import Admission
from daemon.orchestrator.core import Scheduler
from daemon.orchestrator.identity import Identity, Refused
from daemon.orchestrator.store import Store
from daemon.orchestrator.users import Users
from daemon.protocol.admin import AdminReply, AdminRequest, OrchestratorStats

# Sends a reply: (topic, message, MQTT 5 correlation data).
Reply = Callable[[str, Message, bytes | None], None]

log = logging.getLogger(__name__)

OPEN_OPS: Final = frozenset({"tasks", "stats", "peers"})


class AdminError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Admin:
    """Built from the parts it needs: who asks (admission), the users database,
    the task table and peers (scheduler, its registry), history (store), the
    stats snapshot, and a way to reply."""

    def __init__(
        self,
        *,
        state_dir: Path,
        admission: Admission,
        users: Users,
        scheduler: Scheduler,
        store: Store,
        stats: Callable[[], OrchestratorStats],
        reply: Reply,
    ) -> None:
        self.token_file = state_dir / "sysop.token"
        self.admission = admission
        self.users = users
        self.scheduler = scheduler
        self.store = store
        self.stats = stats
        self.reply = reply

    async def bootstrap_sysop(self) -> None:
        users = self.users
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
        account = self.admission.request_account(msg, topics.ORCH_ADMIN, "admin")
        if account is None:
            return
        reply_topic = msg.response_topic
        correlation: str | None = None
        try:
            req = decode(msg.payload, AdminRequest)
            correlation = req.correlation
            reply_topic = reply_topic or req.reply_to
            result = await self.handle(req, account)
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
        if self.admission.reply_ok(reply_topic, account):
            self.reply(reply_topic, reply, msg.correlation_data)
        elif reply_topic:
            log.warning(
                "admin reply to %r refused: outside %s's reply topics", reply_topic[:200], account
            )

    def _authorise(self, req: AdminRequest, account: str) -> Identity:
        try:
            ident = self.admission.identify(account, req.token, req.user)
        except Refused as exc:
            raise AdminError(exc.code, str(exc)) from exc
        if req.op not in OPEN_OPS and ident.role not in ("sysop", "orchestrator"):
            raise AdminError("forbidden", f"'{req.op}' needs the sysop role")
        if ident.role == "guest":
            raise AdminError("forbidden", "guests have no admin views")
        return ident

    async def handle(self, req: AdminRequest, account: str) -> Any:
        ident = self._authorise(req, account)
        if req.op not in OPEN_OPS:
            log.info("sysop %s: %s %s", ident.name, req.op, _args_for_log(req.args))
        # Others' tasks are theirs: a non-sysop sees only its own in the task list.
        mine_only = ident.role not in ("sysop", "orchestrator")
        a = req.args
        op = req.op
        if op == "stats":
            return self.stats().model_dump(mode="json")
        if op == "peers":
            return self.stats().peers
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
                for t in self.scheduler.tasks.values()
                if not mine_only or t.user == ident.name
            ]
        if op == "history":
            return await self.store.history(
                int(a.get("limit", 50)), a.get("user"), a.get("capability")
            )
        if op == "users":
            return self.users.all()
        if op == "user_add":
            role = a.get("role", "user")
            if role not in ("sysop", "user", "guest", "node", "device"):
                raise AdminError("bad_request", f"unknown role {role!r}")
            return {"name": _name(a), "role": role, "token": await self.users.add(_name(a), role)}
        if op == "user_remove":
            return {"removed": await self.users.remove(_name(a))}
        if op in ("ban", "unban"):
            await self.users.set_ban(_name(a), op == "ban", a.get("reason"))
            return {"name": _name(a), "banned": op == "ban"}
        if op in ("drain", "undrain", "blacklist", "unblacklist"):
            return self._peer_op(op, str(a.get("node", "")))
        if op == "cancel":
            task_id = str(a.get("task_id", ""))
            ok = self.scheduler.cancel(task_id, None, a.get("reason") or "cancelled by sysop")
            if not ok:
                raise AdminError("not_found", f"no active task {task_id!r}")
            return {"cancelled": task_id}
        raise AdminError("bad_request", f"unknown op {op!r}")

    def _peer_op(self, op: str, node_id: str) -> dict[str, Any]:
        registry = self.scheduler.registry
        if op in ("drain", "undrain"):
            peer = registry.set_flags(node_id, drained=op == "drain")
        else:
            peer = registry.set_flags(node_id, blacklisted=op == "blacklist")
        if peer is None:
            raise AdminError("not_found", f"no peer {node_id!r}")
        self.scheduler.dispatch_peer(node_id)
        log.info("sysop: %s %s", op, node_id)
        return {"node": node_id, "drained": peer.drained, "blacklisted": peer.blacklisted}


def _args_for_log(args: dict[str, Any]) -> str:
    """Admin arguments for a log line: short, no secrets."""
    return ", ".join(
        f"{k}={'***' if k in SECRET_KEYS else str(v)[:64]}" for k, v in list(args.items())[:8]
    )


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise AdminError("bad_request", "'name' must be a non-empty string")
    return name
