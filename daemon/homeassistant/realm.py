"""The realm device: realm-wide entities the orchestrator announces (the ``armed`` panel).

The realm's ``armed`` state is not one node's: the orchestrator owns it (its
state store validates ``state/armed/set`` and publishes the retained
``state/armed``), so the orchestrator publishes it as an
``alarm_control_panel`` of a "realm" device, available while the
orchestrator is online.  Home Assistant's arm/disarm actions publish a
:class:`~daemon.protocol.state.StateSet` through the panel's
``command_template``; the new retained state is the report back, shown
through :mod:`daemon.homeassistant.panel` (the armed value, or ``triggered``
while a camera's alarm goes off).
"""

from __future__ import annotations

from typing import Final

from daemon import topics
from daemon.bus import Bus
from daemon.config import Config
from daemon.entities import EntitySpec
from daemon.homeassistant.bridge import Bridge, device_id
from daemon.homeassistant.discovery import Device
from daemon.homeassistant.panel import AlarmPanel, panel_topic

ARMED_KEY: Final = "armed"
# Home Assistant alarm actions -> the realm's armed values (the panel's payloads).
ALARM_PAYLOADS: Final = {
    "disarmed": "payload_disarm",
    "armed_home": "payload_arm_home",
    "armed_away": "payload_arm_away",
    "armed_night": "payload_arm_night",
    "armed_vacation": "payload_arm_vacation",
}
# What Home Assistant sends becomes a StateSet; "{{ action }}" is the payload_* chosen.
STATE_SET_TEMPLATE: Final = '{"type":"state.set","v":1,"value":"{{ action }}"}'
# With an alarm code, Home Assistant asks for it and passes it on: the orchestrator checks it.
STATE_SET_CODE_TEMPLATE: Final = (
    '{"type":"state.set","v":1,"value":"{{ action }}","code":"{{ code }}"}'
)


def armed_panel(config: Config) -> EntitySpec:
    """The ``alarm_control_panel`` bound to ``state/armed`` (values from the state store)."""
    realm = config.realm
    allowed = [str(v) for v in config.orchestrator.state_values.get(ARMED_KEY, [])]
    values = [v for v in allowed if v in ALARM_PAYLOADS] or ["disarmed", "armed_away"]
    extra: dict[str, object] = {ALARM_PAYLOADS[v]: v for v in values}
    extra["supported_features"] = [
        ALARM_PAYLOADS[v].removeprefix("payload_") for v in values if v != "disarmed"
    ]
    orch = config.orchestrator
    if orch.alarm_code is not None or orch.alarm_code_file is not None:
        extra["code"] = "REMOTE_CODE"  # HA asks for a code; the realm checks it
        extra["command_template"] = STATE_SET_CODE_TEMPLATE
        extra["code_arm_required"] = False
        extra["code_disarm_required"] = True
    else:
        extra["command_template"] = STATE_SET_TEMPLATE
        extra["code_arm_required"] = False
        extra["code_disarm_required"] = False
    return EntitySpec(
        component="alarm_control_panel",
        object_id=ARMED_KEY,
        name="Armed",
        # The armed value, or `triggered` after a camera's alarm (daemon.homeassistant.panel).
        state_topic=panel_topic(realm),
        # Under Home Assistant's own account: only it may write there (the broker ACL).
        command_topic=topics.STATE_SET.build(
            realm=realm, key=ARMED_KEY, user=config.homeassistant.account
        ),
        options=tuple(values),
        extra=extra,
    )


def realm_bridge(bus: Bus, config: Config) -> Bridge:
    """The realm device's bridge (the orchestrator starts it and refreshes it on connect)."""
    ha = config.homeassistant
    ident = device_id(config.realm, "realm")
    device = Device(
        ha_node_id=ident,
        identifier=ident,
        name=f"M-TOR realm {config.realm}",
        model="M-TOR realm",
        availability_topic=topics.ORCH_STATE.build(realm=config.realm),
        support_url=ha.support_url,
    )
    panel = armed_panel(config)
    return Bridge(
        bus,
        ha,
        device,
        realm=config.realm,
        node_id="realm",
        entities=lambda: [panel],
        commands=False,  # the panel's commands go to state/armed/set (the state store)
    )


async def attach(bus: Bus, config: Config) -> Bridge:
    """Start the realm bridge on ``bus``: subscriptions now, discovery on every connect."""
    bridge = realm_bridge(bus, config)
    if config.homeassistant.enabled:
        # Lives as long as its subscriptions: the panel state follows armed and alarms.
        await AlarmPanel(bus, config.realm).start()
    await bridge.start()
    bus.on_connect(bridge.refresh)
    return bridge
