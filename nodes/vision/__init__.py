"""Vision: object detection (YOLO ONNX, HOG), faces, image description and generation.

Registers the ``vision`` node type; it is offered where OpenCV is installed
(each backend still fails soft in the node, which advertises what started).
"""

import importlib.util

from daemon.plugins import Offer, register_node_type
from nodes.vision.config import VisionConfig


def _offer() -> Offer:
    if importlib.util.find_spec("cv2") is None:
        return Offer(None, "OpenCV (cv2) is not installed")
    return Offer(VisionConfig())


register_node_type("vision", VisionConfig, "nodes.vision.node:VisionNode", _offer)
