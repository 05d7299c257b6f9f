"""The detectors that know the world: the person SSD (a TensorFlow frozen graph read by
OpenCV with a text graph derived here) and COCO yolov3-tiny (Darknet), on real photos
(scikit-image's data), and the best detector per label as one."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from daemon.modelstore import ModelStore
from nodes.vision import pbtxt
from nodes.vision.coco import canonical
from nodes.vision.combined import DetectorSet
from nodes.vision.config import DarknetConfig, SsdTfConfig, YoloOnnxConfig
from nodes.vision.darknet import DarknetDetector
from nodes.vision.detect import DetectorEnv, DetectorUnavailable, load_detector
from nodes.vision.ssd import SsdTfDetector
from nodes.vision.ssd_graph import GraphError, SsdSettings, derive

STORE = ModelStore.default()


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as BGR (``motorcycle``: the left view of its stereo pair)."""
    loader = getattr(skdata, "stereo_motorcycle" if name == "motorcycle" else name)
    img = np.asarray(loader()[0] if name == "motorcycle" else loader())
    code = cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR
    return np.asarray(cv2.cvtColor(img, code))


@pytest.fixture(scope="module")
def ssd() -> SsdTfDetector:
    det = load_detector(SsdTfConfig(), DetectorEnv(store=STORE))
    assert isinstance(det, SsdTfDetector)
    return det


@pytest.fixture(scope="module")
def coco() -> DarknetDetector:
    det = load_detector(DarknetConfig(), DetectorEnv(store=STORE))
    assert isinstance(det, DarknetDetector)
    return det


# ------------------------------------------------------------ text graph


def test_pbtxt_roundtrip() -> None:
    text = (
        'node {\n  name: "a/b"\n  op: "Conv2D"\n'
        '  attr {\n    key: "s"\n    value {\n      s: "x\\"y"\n    }\n  }\n}\n'
    )
    msg = pbtxt.parse(text)
    assert pbtxt.dump(msg) == text
    node = msg.message("node")
    assert node is not None and node.string("name") == "a/b"
    with pytest.raises(pbtxt.TextFormatError):
        pbtxt.parse("node { name: ")
    with pytest.raises(pbtxt.TextFormatError):
        pbtxt.parse("}")


def test_anchor_specs_follow_the_tf_api() -> None:
    specs = SsdSettings().box_specs()
    assert [len(s) for s in specs] == [3, 6, 6, 6, 6, 6]
    assert specs[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
    assert specs[1][0] == pytest.approx((0.35, 1.0))
    assert specs[5][-1][0] == pytest.approx((0.95 * 1.0) ** 0.5)  # interpolated with 1.0


def test_text_graph_is_derived_from_the_graph_reproducibly() -> None:
    pb = STORE.path("ssdlite-mobilenet-v2-person")
    one = derive(pb, SsdSettings())
    assert one.num_classes == 1 and one.anchors == [3, 6, 6, 6, 6, 6]
    assert derive(pb, SsdSettings()).text == one.text  # same input, same bytes
    assert 'name: "detection_out"' in one.text and "Preprocessor/" not in one.text
    assert "Postprocessor/" not in one.text and 'op: "Const"' in one.text
    with pytest.raises(GraphError, match="box predictor layers"):
        derive(pb, SsdSettings(num_layers=5))
    with pytest.raises(GraphError, match="boxes per cell"):
        derive(pb, SsdSettings(reduce_boxes_in_lowest_layer=False))


def test_a_missing_model_is_unavailable_not_faked(tmp_path: Path) -> None:
    env = DetectorEnv(store=STORE)
    with pytest.raises(DetectorUnavailable, match="does not exist"):
        load_detector(SsdTfConfig(model_path=tmp_path / "none.pb"), env)
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"not a graph")
    with pytest.raises(DetectorUnavailable):
        load_detector(SsdTfConfig(model_path=bad), env)
    with pytest.raises(DetectorUnavailable, match="folder"):
        load_detector(DarknetConfig(model_path=bad), env)
    with pytest.raises(DetectorUnavailable, match=r"\.cfg"):
        load_detector(DarknetConfig(model_path=tmp_path), env)
    empty = ModelStore(tmp_path / "models")
    with pytest.raises(DetectorUnavailable):
        load_detector(SsdTfConfig(model="nope"), DetectorEnv(store=empty))


# ----------------------------------------------------------------- photos


def test_the_person_detector_says_person_for_the_astronaut(ssd: SsdTfDetector) -> None:
    assert ssd.labels == ["person"]
    found = ssd.detect(photo("astronaut"))
    assert found and found[0].label == "person" and found[0].score > 0.8
    x1, y1, x2, y2 = found[0].box
    assert x2 - x1 > 250 and y2 - y1 > 350  # her, not a patch of the flag


@pytest.mark.parametrize("name", ["chelsea", "coffee", "motorcycle", "rocket"])
def test_the_person_detector_sees_no_one_where_no_one_is(ssd: SsdTfDetector, name: str) -> None:
    assert ssd.detect(photo(name)) == [], name


def test_coco_labels_are_coco_names(coco: DarknetDetector) -> None:
    assert len(coco.labels) == 80 and coco.labels[0] == "person"
    assert "motorcycle" in coco.labels and "motorbike" not in coco.labels
    assert "tv" in coco.labels and "dining table" in coco.labels
    assert canonical(["aeroplane ", "cat"]) == ["airplane", "cat"]


def test_coco_finds_the_cup_and_the_motorcycle(coco: DarknetDetector) -> None:
    assert "cup" in {d.label for d in coco.detect(photo("coffee"))}
    assert "motorcycle" in {d.label for d in coco.detect(photo("motorcycle"))}
    assert "person" not in {d.label for d in coco.detect(photo("chelsea"))}


def test_best_detector_per_label(ssd: SsdTfDetector, coco: DarknetDetector) -> None:
    best = DetectorSet([ssd, coco], ["person", "cup", "cat", "unicorn"])
    assert best.owner["person"] is ssd and best.owner["cup"] is coco
    assert best.missing == ["unicorn"] and best.labels == ["person", "cup", "cat"]
    assert best.model == "ssdlite-mobilenet-v2-person+yolov3-tiny-coco"
    people = best.detect(photo("astronaut"))
    assert people and people[0].label == "person" and people[0].score > 0.8
    assert "cup" in {d.label for d in best.detect(photo("coffee"))}
    assert all(d.label != "person" for d in best.detect(photo("chelsea")))
    only_person = DetectorSet([ssd, coco], ["person"])
    assert [d for d, _ in only_person.plan] == [ssd]  # COCO is not even run


def test_the_fall_model_is_an_optional_fall_detector() -> None:
    fall = load_detector(YoloOnnxConfig(), DetectorEnv(store=STORE))
    assert fall.labels == ["upright", "fall"]
    assert "person" not in fall.labels  # a cat it calls upright never becomes a person
