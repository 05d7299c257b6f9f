"""Chat backends: one module each, imported lazily (their packages are optional)."""
