"""The realm orchestrator: registry, queues, assignment, health, history, users, admin."""
