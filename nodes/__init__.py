"""Node types and their backends.  ``nodes.catalog`` lists every type."""
