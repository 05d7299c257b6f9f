"""COCO label names: the one vocabulary of every detector's labels.

Darknet's ``coco.names`` spells six classes its own way (``motorbike``,
``aeroplane``, ...); events, counts and alarm rules use the COCO dataset's
names, so a detector's names are mapped here once when it loads.
"""

from __future__ import annotations

from typing import Final

DARKNET_ALIASES: Final = {
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "tvmonitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
}


def canonical(names: list[str]) -> list[str]:
    """``names`` with Darknet's spellings replaced by COCO's."""
    return [DARKNET_ALIASES.get(n.strip(), n.strip()) for n in names]
