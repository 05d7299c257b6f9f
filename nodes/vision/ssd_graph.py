"""The text graph OpenCV needs to run a TensorFlow Object Detection API SSD.

A frozen SSD graph holds its pre-processing (a ``tf.map`` loop), its anchor
generator and its post-processing (a batched NMS loop) as TensorFlow ops
OpenCV's ``dnn`` cannot import.  OpenCV's documented way (its
``tf_text_graph_ssd`` sample) is a text description of the network that
keeps only the convolutional part and replaces the rest with OpenCV's own
layers: ``PriorBox`` (anchors) and ``DetectionOutput`` (box decoding + NMS).
This module derives that description, deterministically, from two inputs:

* the graph itself (read through ``cv2.dnn.writeTextGraph``): the layers that
  feed each ``BoxPredictor_<i>`` head, and the number of classes (the width of
  the class predictor's bias over the anchors of the layer);
* the model's pipeline settings (``ssd_anchor_generator``, input size,
  post-processing), from the model manifest: :class:`SsdSettings`.

Weights stay in the binary graph: the description names the constant nodes
and OpenCV reads them from the ``.pb`` by name.  Pre-processing (resize to
the input size, RGB, ``x / 127.5 - 1``) is done by ``cv2.dnn.blobFromImage``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from daemon.errors import MtorError
from nodes.vision import pbtxt
from nodes.vision.pbtxt import Message

INPUT: Final = "image_tensor"
OUTPUT: Final = "detection_out"
# Ops of the feature extractor and box predictors that OpenCV imports.
KEEP_OPS: Final = frozenset(
    {
        "Conv2D",
        "DepthwiseConv2dNative",
        "BiasAdd",
        "FusedBatchNorm",
        "FusedBatchNormV3",
        "Relu",
        "Relu6",
        "Add",
        "AddV2",
        "Mul",
        "Sub",
        "ConcatV2",
        "MaxPool",
        "AvgPool",
        "Pad",
        "Mean",
        "ResizeNearestNeighbor",
    }
)
# Attributes the importer does not read (dropping them keeps the text small).
DROP_ATTRS: Final = frozenset({"T", "_output_shapes", "use_cudnn_on_gpu"})
# Faster R-CNN box coder scales of the TF API (y, x, h, w = 10, 10, 5, 5) as variances.
VARIANCE: Final = (0.1, 0.1, 0.2, 0.2)


class GraphError(MtorError):
    """The graph is not an SSD this module understands, or disagrees with its settings."""


@dataclass(frozen=True)
class SsdSettings:
    """The pipeline settings of an SSD (``ssd_anchor_generator`` and friends)."""

    width: int = 300
    height: int = 300
    num_layers: int = 6
    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True
    nms_iou: float = 0.6
    score_threshold: float = 0.01
    max_detections: int = 100

    def box_specs(self) -> list[list[tuple[float, float]]]:
        """(scale, aspect ratio) of each anchor of each layer, in the TF API's order."""
        n = self.num_layers
        scales = [
            self.min_scale + (self.max_scale - self.min_scale) * i / max(1, n - 1) for i in range(n)
        ] + [1.0]
        layers: list[list[tuple[float, float]]] = []
        for i in range(n):
            if i == 0 and self.reduce_boxes_in_lowest_layer:
                layers.append([(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)])
                continue
            specs = [(scales[i], ar) for ar in self.aspect_ratios]
            if self.interpolated_scale_aspect_ratio > 0:
                specs.append(
                    (math.sqrt(scales[i] * scales[i + 1]), self.interpolated_scale_aspect_ratio)
                )
            layers.append(specs)
        return layers


@dataclass
class SsdGraph:
    text: str
    num_classes: int  # without the background
    anchors: list[int] = field(default_factory=list)  # per layer


# ------------------------------------------------------------ node builders


def _attr(node: Message, key: str, value: Message) -> None:
    node.add("attr", Message().add("key", pbtxt.quote(key)).add("value", value))


def _scalar(kind: str, value: str) -> Message:
    return Message().add(kind, value)


def _tensor(values: list[float] | list[int]) -> Message:
    floats = any(isinstance(v, float) for v in values)
    shape = Message().add("dim", Message().add("size", str(len(values))))
    t = Message().add("dtype", "DT_FLOAT" if floats else "DT_INT32").add("tensor_shape", shape)
    for v in values:
        t.add("float_val" if floats else "int_val", repr(float(v)) if floats else str(int(v)))
    return Message().add("tensor", t)


def _node(name: str, op: str, inputs: list[str]) -> Message:
    node = Message().add("name", pbtxt.quote(name)).add("op", pbtxt.quote(op))
    for inp in inputs:
        node.add("input", pbtxt.quote(inp))
    return node


def _const(name: str, values: list[int]) -> Message:
    node = _node(name, "Const", [])
    _attr(node, "value", _tensor(values))
    return node


# ------------------------------------------------------------------ derive


def _read_text(pb: Path) -> str:
    import cv2

    with tempfile.TemporaryDirectory(prefix="mtor-ssd-") as tmp:
        out = Path(tmp) / "graph.pbtxt"
        try:
            cv2.dnn.writeTextGraph(str(pb), str(out))
        except cv2.error as exc:
            raise GraphError(f"{pb}: not a TensorFlow graph OpenCV can read: {exc}") from exc
        return out.read_text()


def _bias_size(nodes: dict[str, Message], name: str) -> int:
    """Length of the bias constant added by BiasAdd ``name`` (its second input)."""
    add = nodes.get(name)
    if add is None:
        raise GraphError(f"the graph has no {name}")
    inputs = [pbtxt.unquote(str(v)) for v in add.all("input")]
    base = _base(inputs[1]) if len(inputs) > 1 else ""
    seen = 0
    while base in nodes and nodes[base].string("op") == "Identity" and seen < 16:
        base = _base(pbtxt.unquote(str(nodes[base].all("input")[0])))
        seen += 1
    const = nodes.get(base)
    if const is None or const.string("op") != "Const":
        raise GraphError(f"{name}: its bias is not a constant")
    for attr in const.all("attr"):
        if isinstance(attr, Message) and attr.string("key") == "value":
            value = attr.message("value")
            tensor = value.message("tensor") if value else None
            shape = tensor.message("tensor_shape") if tensor else None
            dims = [d for d in shape.all("dim") if isinstance(d, Message)] if shape else []
            if len(dims) == 1:
                return int(str(dims[0].get("size")))
    raise GraphError(f"{name}: bias shape unknown")


def _base(name: str) -> str:
    name = name.lstrip("^")
    head, _, index = name.partition(":")
    return head if index in ("", "0") else name


def _nodes(pb: Path) -> dict[str, Message]:
    graph = pbtxt.parse(_read_text(pb))
    nodes: dict[str, Message] = {}
    for n in graph.all("node"):
        if isinstance(n, Message) and (name := n.string("name")):
            nodes[name] = n
    return nodes


def _classes(pb: Path, nodes: dict[str, Message], settings: SsdSettings) -> int:
    """Classes (without the background) the heads predict; checks the anchor settings."""
    layers = 0
    while f"BoxPredictor_{layers}/BoxEncodingPredictor/BiasAdd" in nodes:
        layers += 1
    if layers != settings.num_layers:
        raise GraphError(
            f"{pb}: {layers} box predictor layers in the graph, the settings say "
            f"{settings.num_layers}"
        )
    classes: set[int] = set()
    for i, layer in enumerate(settings.box_specs()):
        a = len(layer)
        boxes = _bias_size(nodes, f"BoxPredictor_{i}/BoxEncodingPredictor/BiasAdd")
        scores = _bias_size(nodes, f"BoxPredictor_{i}/ClassPredictor/BiasAdd")
        if boxes != 4 * a or scores % a:
            raise GraphError(
                f"{pb}: layer {i} predicts {boxes // 4} boxes per cell, the anchor settings "
                f"give {a}"
            )
        classes.add(scores // a - 1)
    if len(classes) != 1 or min(classes) < 1:
        raise GraphError(f"{pb}: inconsistent class counts {sorted(classes)}")
    return classes.pop()


def _feature_layers(pb: Path, nodes: dict[str, Message], roots: list[str]) -> list[Message]:
    """The layers feeding ``roots``, inputs first: Identity skipped, pre-processing cut
    (the input placeholder takes its place), constants left to the binary graph."""
    kept: list[Message] = []
    done: set[str] = set()

    def resolve(name: str) -> str:
        base = _base(name)
        for _ in range(64):
            if base.startswith("Preprocessor/"):
                return INPUT
            node = nodes.get(base)
            if node is None or node.string("op") != "Identity":
                return base
            base = _base(pbtxt.unquote(str(node.all("input")[0])))
        raise GraphError(f"{pb}: an Identity chain does not end")

    stack: list[tuple[str, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        current, expanded = stack.pop()
        if current in done or current == INPUT:
            continue
        node = nodes.get(current)
        if node is None:
            raise GraphError(f"{pb}: no node {current}")
        op = node.string("op") or ""
        if op == "Const":
            done.add(current)  # read from the binary graph by name
            continue
        if op not in KEEP_OPS:
            raise GraphError(f"{pb}: op {op} ({current}) is not supported by this derivation")
        inputs = [
            resolve(pbtxt.unquote(str(v))) for v in node.all("input") if not str(v).startswith('"^')
        ]
        if not expanded:
            stack.append((current, True))
            stack.extend((inp, False) for inp in reversed(inputs) if inp not in done)
            continue
        out = _node(current, op, inputs)
        for attr in node.all("attr"):
            if isinstance(attr, Message) and attr.string("key") not in DROP_ATTRS:
                out.add("attr", attr)
        kept.append(out)
        done.add(current)
    return kept


def _prior_boxes(out: Message, settings: SsdSettings) -> None:
    """One PriorBox per layer (anchors in input pixels), concatenated as 1x2xNx1."""
    out.add("node", _const("reshape_prior_boxes_to_4d", [1, 2, -1, 1]))
    priors = []
    for i, layer in enumerate(settings.box_specs()):
        name = f"PriorBox_{i}"
        prior = _node(name, "PriorBox", [f"BoxPredictor_{i}/BoxEncodingPredictor/BiasAdd", INPUT])
        _attr(prior, "flip", _scalar("b", "false"))
        _attr(prior, "clip", _scalar("b", "false"))
        widths = [s * math.sqrt(ar) * settings.width for s, ar in layer]
        heights = [s / math.sqrt(ar) * settings.height for s, ar in layer]
        _attr(prior, "width", _tensor([round(w, 4) for w in widths]))
        _attr(prior, "height", _tensor([round(h, 4) for h in heights]))
        _attr(prior, "variance", _tensor(list(VARIANCE)))
        out.add("node", prior)
        out.add("node", _node(f"{name}/4d", "Reshape", [name, "reshape_prior_boxes_to_4d"]))
        priors.append(f"{name}/4d")
    out.add("node", _node("PriorBox/concat", "ConcatV2", [*priors, "PriorBox/concat/axis"]))


def _detection_output(num_classes: int, settings: SsdSettings) -> Message:
    det = _node(
        OUTPUT,
        "DetectionOutput",
        ["BoxEncodingPredictor/concat", "ClassPredictor/concat/sigmoid", "PriorBox/concat"],
    )
    _attr(det, "num_classes", _scalar("i", str(num_classes + 1)))
    _attr(det, "share_location", _scalar("b", "true"))
    _attr(det, "background_label_id", _scalar("i", "0"))
    _attr(det, "nms_threshold", _scalar("f", repr(float(settings.nms_iou))))
    _attr(det, "top_k", _scalar("i", str(settings.max_detections)))
    _attr(det, "keep_top_k", _scalar("i", str(settings.max_detections)))
    _attr(det, "code_type", _scalar("s", pbtxt.quote("CENTER_SIZE")))
    _attr(det, "confidence_threshold", _scalar("f", repr(float(settings.score_threshold))))
    # TF predicts (y, x, h, w); OpenCV's layer expects (x, y, w, h) unless told.
    _attr(det, "loc_pred_transposed", _scalar("b", "true"))
    return det


def derive(pb: Path, settings: SsdSettings) -> SsdGraph:
    """The text graph of the SSD frozen graph ``pb`` (blocking, ~0.2 s)."""
    nodes = _nodes(pb)
    num_classes = _classes(pb, nodes, settings)
    heads = ("BoxEncodingPredictor", "ClassPredictor")
    layers = range(settings.num_layers)
    roots = [f"BoxPredictor_{i}/{head}/BiasAdd" for i in layers for head in heads]

    out = Message()
    placeholder = _node(INPUT, "Placeholder", [])
    _attr(placeholder, "dtype", _scalar("type", "DT_FLOAT"))
    out.add("node", placeholder)
    for n in _feature_layers(pb, nodes, roots):
        out.add("node", n)
    out.add("node", _const("concat/axis_flatten", [-1]))
    out.add("node", _const("PriorBox/concat/axis", [-2]))
    for head in heads:
        flat = []
        for i in layers:
            source = f"BoxPredictor_{i}/{head}/BiasAdd"
            out.add("node", _node(source + "/Flatten", "Flatten", [source]))
            flat.append(source + "/Flatten")
        out.add("node", _node(f"{head}/concat", "ConcatV2", [*flat, "concat/axis_flatten"]))
    _prior_boxes(out, settings)
    out.add("node", _node("ClassPredictor/concat/sigmoid", "Sigmoid", ["ClassPredictor/concat"]))
    out.add("node", _detection_output(num_classes, settings))
    anchors = [len(layer) for layer in settings.box_specs()]
    return SsdGraph(pbtxt.dump(out), num_classes, anchors)


def main(argv: list[str] | None = None) -> int:
    """``python -m nodes.vision.ssd_graph GRAPH.pb OUT.pbtxt``: write the description."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m nodes.vision.ssd_graph GRAPH.pb OUT.pbtxt", file=sys.stderr)
        return 2
    graph = derive(Path(args[0]), SsdSettings())
    Path(args[1]).write_text(graph.text)
    print(f"{args[1]}: {graph.num_classes} classes, anchors per layer {graph.anchors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
