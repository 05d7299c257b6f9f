"""Message families of the wire protocol (see docs/protocol.md).

Importing this package registers every message type.
"""

from daemon.protocol import admin as admin
from daemon.protocol import common as common
from daemon.protocol import node as node
from daemon.protocol import state as state
from daemon.protocol import swarm as swarm
from daemon.protocol import task as task
from daemon.protocol import workflow as workflow
