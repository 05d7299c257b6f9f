"""Home Assistant: MQTT discovery, availability, birth handling and commands.

* :mod:`daemon.homeassistant.config` — the ``homeassistant`` config section;
* :mod:`daemon.homeassistant.discovery` — pure functions turning an
  :class:`~daemon.entities.EntitySpec` into a discovery config payload;
* :mod:`daemon.homeassistant.bridge` — the bridge each node daemon runs
  (publish, re-announce on Home Assistant's birth, clear removed entities,
  route commands);
* :mod:`daemon.homeassistant.realm` — the realm device (the ``armed`` alarm
  panel) the orchestrator publishes.

Nothing is imported here so that ``daemon.config`` can import the config
model without pulling in the bus.
"""
