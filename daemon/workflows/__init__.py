"""Workflows: event-driven automation across the realm (see docs/workflows.md).

``model`` (definitions), ``templating`` (safe templates), ``conditions``,
``runner`` (one run), ``engine`` (triggers and limits), ``realm`` (in the
orchestrator), ``local`` (in a node daemon), ``loader`` (config + directory).
"""
