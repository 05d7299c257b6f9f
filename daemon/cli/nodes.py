"""Which nodes ``mtor node`` hosts: those the config names, or every node type
that works on this machine.

A config with a ``nodes:`` key runs exactly those.  Without one (the shipped
config.yaml leaves it commented out) the daemon hosts every node type whose
offer probe finds its packages and models here (:func:`daemon.plugins.offers`):
sensors and reference always, chat, vision and a voice stt/tts server where
their extras and models are installed — what ``mtor up`` runs, so a second
machine joins with what it has.  ``--auto-nodes`` (what ``mtor up`` passes)
adds the offered types a config does not already have beside the ones it
names.  A type that is not offered is logged with the reason, never faked;
each backend of an offered node still fails soft and is left out of the advert.
"""

from __future__ import annotations

import logging

from daemon.config import Config
from daemon.plugins import NodeConfigBase, offers

log = logging.getLogger(__name__)


def hosted_config(config: Config, *, add_offers: bool = False) -> Config:
    """``config`` with the nodes ``mtor node`` hosts (see the module docstring)."""
    if config.nodes_named and not add_offers:
        return config
    named: dict[str, NodeConfigBase] = dict(config.nodes) if config.nodes_named else {}
    have = {entry.type for entry in named.values()}
    nodes = dict(named)
    for type_name, offer in offers().items():
        if type_name in have:
            continue
        if offer.entry is None:
            log.info("node type %s not offered here: %s", type_name, offer.reason)
        elif type_name in nodes:
            log.warning(
                "node type %s not offered: the config has a node named %r", *(type_name,) * 2
            )
        else:
            nodes[type_name] = offer.entry
    why = "the config names none" if not config.nodes_named else "--auto-nodes"
    log.info("hosting the nodes that work here (%s): %s", why, ", ".join(nodes) or "none")
    return config.model_copy(update={"nodes": nodes})
