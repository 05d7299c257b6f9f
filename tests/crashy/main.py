"""``mtor`` with the test-only ``crashy`` node type registered:
``python -m tests.crashy.main node --config ...``."""

import sys

import tests.crashy  # noqa: F401  (registers the node type)
from daemon.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
