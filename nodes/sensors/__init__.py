"""The sensors node: host metrics, command sensors and file (sysfs / 1-wire) sensors."""
