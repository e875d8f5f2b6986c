"""Per-host settings of the encryptor classes.

Read from an INI file, ``/etc/luks-agent/os-brick.conf`` unless the
environment variable ``LUKS_AGENT_OS_BRICK_CONF`` names another; a missing
file means the defaults::

    [agent]
    # The agent's socket (the group that owns it must include the user
    # nova-compute and cinder-volume run as).
    socket = /run/luks-agent/agent.sock
    # dm: a dm-crypt mapping; the connector's device path is repointed to
    # it. libvirt: QEMU decrypts LUKS1 itself; the agent defines the
    # volume's libvirt secret, which nova's disk config then uses.
    mode = dm
    # Seconds to wait for the agent's answer.
    timeout = 600
    # Send a service token with the user's (X-Service-Token), taken from
    # nova's or cinder's [service_user] settings: none | nova | cinder.
    service_token = none
"""

from __future__ import annotations

import configparser
import dataclasses
import os

from luks_agent_os_brick.client import DEFAULT_SOCKET

#: The settings file unless ``LUKS_AGENT_OS_BRICK_CONF`` names another.
DEFAULT_PATH = "/etc/luks-agent/os-brick.conf"

MODES = ("dm", "libvirt")
SERVICE_TOKENS = ("none", "nova", "cinder")


class SettingsError(ValueError):
    """A settings file that cannot be used; names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the encryptor classes need to know about this host."""

    socket: str = DEFAULT_SOCKET
    mode: str = "dm"
    timeout: float = 600.0
    service_token: str = "none"


def load(path: str = "") -> Settings:
    """The settings in ``path`` (default: see the module documentation)."""
    path = path or os.environ.get("LUKS_AGENT_OS_BRICK_CONF") or DEFAULT_PATH
    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return Settings()
    except (OSError, configparser.Error) as e:
        raise SettingsError(f"{path}: {e}") from None
    unknown = [s for s in parser.sections() if s != "agent"]
    if unknown:
        raise SettingsError(f"{path}: unknown section [{unknown[0]}] (only [agent])")
    if not parser.has_section("agent"):
        return Settings()
    agent = parser["agent"]
    known = {f.name for f in dataclasses.fields(Settings)}
    for key in agent:
        if key not in known:
            raise SettingsError(f"{path}: unknown key '{key}' in [agent] (known: {', '.join(sorted(known))})")
    s = Settings()
    mode = agent.get("mode", s.mode).strip()
    if mode not in MODES:
        raise SettingsError(f"{path}: mode = {mode!r}; use dm or libvirt")
    token = agent.get("service_token", s.service_token).strip()
    if token not in SERVICE_TOKENS:
        raise SettingsError(f"{path}: service_token = {token!r}; use none, nova or cinder")
    try:
        timeout = float(agent.get("timeout", str(s.timeout)))
    except ValueError:
        raise SettingsError(f"{path}: timeout must be a number of seconds") from None
    if not 0 < timeout <= 86400:
        raise SettingsError(f"{path}: timeout = {timeout:g}; use 0 < timeout <= 86400")
    return Settings(socket=agent.get("socket", s.socket).strip(), mode=mode,
                    timeout=timeout, service_token=token)
