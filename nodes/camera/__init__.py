"""Cameras: capture, motion, tracked object events, snapshots and the armed alarm rule.

Registers the ``camera`` node type.  It is never offered by itself: a camera
needs its source named in the config.
"""

from daemon.plugins import register_node_type
from nodes.camera.config import CameraConfig

register_node_type("camera", CameraConfig, "nodes.camera.node:CameraNode")
