"""os-brick encryptor classes that hand the work to luks-agent.

A volume type names one of these classes as its encryption provider::

    openstack volume type create --encryption-provider \\
        luks_agent_os_brick.encryptors.LuksEncryptor \\
        --encryption-cipher aes-xts-plain64 --encryption-key-size 256 \\
        --encryption-control-location front-end LUKS-agent

os-brick's ``get_volume_encryptor`` imports any provider that is not one of
its own formats as a class path and builds it with ``(root_helper,
connection_info, keymgr, execute, **encryption)``; nova and cinder-volume
then call ``attach_volume(context, **encryption)``,
``detach_volume(**encryption)`` and ``extend_volume(context,
**encryption)``. The class says the on-disk format (LUKS1, LUKS2, plain);
the agent does everything privileged: it fetches the key from the key
manager with the caller's token, formats on first use only a device that
is provably blank, and maps it (dm mode) or defines the volume's libvirt
secret that nova's disk config then uses (libvirt mode, LUKS1 only).

No key ever passes through here: ``keymgr`` is not used. An agent that is
not running is an error naming its socket, never a fall-back to
cryptsetup.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

from os_brick import exception as brick_exception
from os_brick.encryptors import base

from luks_agent_os_brick import settings as settings_mod
from luks_agent_os_brick.client import AgentClient, AgentError, AgentUnavailable

LOG = logging.getLogger(__name__)


class LuksAgentError(brick_exception.BrickException):
    """An operation the agent refused or could not do.

    ``agent_code`` is the agent's stable error code (``format_refused``,
    ``wrong_key``, ``key_access_denied``, ``agent_unavailable``, ...) and
    ``status`` its HTTP status, for callers that tell them apart.
    """

    message = "luks-agent %(operation)s of volume %(volume_id)s failed: %(agent_code)s: %(reason)s"

    def __init__(self, operation: str, volume_id: str, err: AgentError) -> None:
        self.agent_code = err.code
        self.status = err.status
        self.operation = operation
        super().__init__(operation=operation, volume_id=volume_id,
                         agent_code=err.code, reason=err.message)


class LuksAgentUnavailable(LuksAgentError):
    """Nothing answers on the agent's socket."""


def _volume_id(connection_info: Dict[str, Any]) -> Optional[str]:
    """The volume id as nova's ``get_volume_id`` finds it."""
    serial = connection_info.get("serial")
    if serial:
        return str(serial)
    data = connection_info.get("data") or {}
    vid = data.get("volume_id")
    return str(vid) if vid else None


def _current_context() -> Any:
    """The request context of the operation under way, as nova and cinder
    keep it (oslo.context's per-thread store, filled by every
    ``RequestContext``), or ``None``. Only a module the service already
    imported is read: nothing new is imported here."""
    store = sys.modules.get("oslo_context.context")
    get_current = getattr(store, "get_current", None)
    if get_current is None:
        return None
    try:
        return get_current()
    except Exception:  # a context store we do not know: no token, as before
        return None


def _service_token(source: str) -> Optional[str]:
    """A service token from nova's or cinder's ``[service_user]`` settings,
    when that service is set to send one; ``None`` otherwise."""
    if source == "nova":
        import nova.conf  # noqa: F401 (nova-compute's own configuration)
        from nova import service_auth
        if not nova.conf.CONF.service_user.send_service_user_token:
            return None
        auth = service_auth.get_service_auth_plugin("service_user")
        if auth is None:
            return None
        session = service_auth.get_service_auth_session("service_user", auth=auth)
        return auth.get_token(session)
    if source == "cinder":
        from cinder import service_auth  # cinder-volume's own configuration
        auth = service_auth.get_service_auth_plugin()
        if auth is None:
            return None
        return auth.get_token(service_auth.get_service_session())
    return None


class _AgentEncryptor(base.VolumeEncryptor):
    """Forwards attach, detach and extend to the agent; ``FORMAT`` is the
    provider the agent sees (``luks``, ``luks2`` or ``plain``)."""

    FORMAT = ""

    def __init__(self, root_helper: str, connection_info: Dict[str, Any], keymgr: Any,
                 execute: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(root_helper=root_helper, connection_info=connection_info,
                         keymgr=keymgr, execute=execute, *args, **kwargs)
        self.connection_info = connection_info
        self.settings = settings_mod.load()
        self.client = AgentClient(self.settings.socket, self.settings.timeout)
        data = connection_info.get("data") or {}
        self.device_path: Optional[str] = data.get("device_path")
        self.multipath_id: Optional[str] = data.get("multipath_id")
        self.volume_id = _volume_id(connection_info)

    def _encryption(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """cinder's encryption metadata with the provider as the agent
        knows it (the format, not this class's path)."""
        enc = {k: v for k, v in kwargs.items()
               if k in ("cipher", "key_size", "control_location", "encryption_key_id")}
        enc.setdefault("encryption_key_id", self.encryption_key_id)
        enc.setdefault("control_location", "front-end")
        enc["provider"] = self.FORMAT
        return enc

    def _require(self, operation: str) -> str:
        if not self.volume_id or not self.device_path:
            # An RBD or other network volume: no host device to open or
            # map. cinder's RBD driver encrypts with provider "luks" only.
            raise brick_exception.VolumeEncryptionNotSupported(
                volume_id=self.volume_id or "(unknown)",
                volume_type=f"{type(self).__name__} ({operation} without a host device path)")
        return self.volume_id

    def _call(self, operation: str, body: Dict[str, Any]) -> Dict[str, Any]:
        volume_id = self._require(operation)
        try:
            return self.client.volume_op(operation, volume_id, body)
        except AgentUnavailable as e:
            raise LuksAgentUnavailable(operation, volume_id, e) from None
        except AgentError as e:
            raise LuksAgentError(operation, volume_id, e) from None

    def _body(self, kwargs: Dict[str, Any], context: Any = None) -> Dict[str, Any]:
        body: Dict[str, Any] = {
            "device": self.device_path,
            "encryption": self._encryption(kwargs),
            "mode": self.settings.mode,
        }
        if self.multipath_id:
            body["multipath_id"] = self.multipath_id
        token = getattr(context, "auth_token", None) if context is not None else None
        if token:
            auth: Dict[str, str] = {"token": token}
            service = _service_token(self.settings.service_token)
            if service:
                auth["service_token"] = service
            body["auth"] = auth
        # Without a token (nova's admin context at host boot) the agent
        # fetches the key with its own credentials.
        return body

    def attach_volume(self, context: Any, **kwargs: Any) -> None:
        """Maps the volume (dm mode: the device path now leads to the
        decrypted mapping) or defines its libvirt secret (libvirt mode),
        formatting a provably blank volume on first use."""
        answer = self._call("attach", self._body(kwargs, context))
        LOG.info("luks-agent attached volume %s (%s, %s%s)", self.volume_id,
                 self.settings.mode, answer.get("action"),
                 ", formatted on first use" if answer.get("formatted") else "")

    def detach_volume(self, **kwargs: Any) -> None:
        """Removes the mapping (dm mode) or the secret (libvirt mode);
        detaching a detached volume succeeds. nova passes no context here;
        the one its request stored is used when it carries the user's
        token, so that the agent can take itself off the key's read ACL,
        which only the key's owner may change."""
        answer = self._call("detach", self._body(kwargs, _current_context()))
        LOG.info("luks-agent detached volume %s (%s, %s)", self.volume_id,
                 self.settings.mode, answer.get("action"))

    def extend_volume(self, context: Any, **kwargs: Any) -> int:
        """Grows the mapping to the device's new size; returns the size the
        guest sees in bytes (nova resizes the disk to it)."""
        answer = self._call("extend", self._body(kwargs, context))
        size = answer.get("new_size")
        if not isinstance(size, int) or size <= 0:
            raise LuksAgentError("extend", self.volume_id or "", AgentError(
                "agent_protocol", f"the answer carries no size: {sorted(answer)}"))
        return size


class LuksEncryptor(_AgentEncryptor):
    """LUKS1 volumes (what nova's native path and QEMU open) through
    luks-agent; dm or libvirt mode."""

    FORMAT = "luks"


class Luks2Encryptor(_AgentEncryptor):
    """LUKS2 volumes through luks-agent (dm mode)."""

    FORMAT = "luks2"


class PlainEncryptor(_AgentEncryptor):
    """cryptsetup plain-mode volumes through luks-agent (dm mode)."""

    FORMAT = "plain"
