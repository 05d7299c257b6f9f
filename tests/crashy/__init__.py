"""A test-only node type, ``crashy``, whose "native" backend kills the process with
SIGSEGV on import, on load or mid-task (``tests.crashy_backends``): what a
segfaulting onnxruntime, llama.cpp or OpenCV does to a daemon, without them.

Registered only when this package is imported: by ``python -m tests.crashy.main``
(``mtor`` with this type known) and by the probe child, which imports the
config class when it unpickles the configuration.
"""

from daemon.plugins import register_node_type
from tests.crashy.config import CrashyConfig

register_node_type("crashy", CrashyConfig, "tests.crashy.node:CrashyNode")
