"""M-TOR realm runtime: config, MQTT bus, messages and topics, node lifecycle, CLI."""

__version__ = "0.1.0"
