"""Vision: object detection (YOLO ONNX, HOG), faces, image description and generation."""
