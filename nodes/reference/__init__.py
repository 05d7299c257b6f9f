"""Reference capabilities without a model (``echo``, ``sleep``) for tests and benchmarks."""
