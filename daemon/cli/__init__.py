"""The ``mtor`` command line."""
