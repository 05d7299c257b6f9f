"""The realm over HTTP: an OpenAI-compatible API, REST, a WebSocket and the dashboard.

``mtor gateway`` (and ``mtor up``) runs one ASGI app (FastAPI on uvicorn) beside
one MQTT connection.  Every request is a realm task or request made through
:class:`daemon.client.RealmClient` under the gateway's own broker account
(role ``gateway``), for the person whose bearer API token the request carried:
the token goes along, and the orchestrator checks it again, so rights follow
the token's user (docs/gateway.md, docs/security.md).

Modules: ``config`` (the ``gateway:`` section), ``auth`` (tokens to users),
``hub`` (the live picture: nodes, events, stats, fan-out), ``realm`` (the MQTT
side), ``errors``, ``limits`` (body size), ``audio`` (WAV in and out),
``openai_api``, ``rest``, ``ws``, ``app`` (the ASGI app) and ``server`` (runs it).
"""
