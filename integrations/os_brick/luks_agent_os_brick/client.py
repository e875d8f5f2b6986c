"""The agent's API over its Unix socket, with the standard library only.

One HTTP/1.1 request per connection (``http.client`` on an ``AF_UNIX``
socket), a bounded wait, and every failure turned into an
:class:`AgentError` that carries the agent's error code, HTTP status and
message. Tokens travel in the request body; they are never logged and
never part of an exception's text.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any, Dict, Optional

#: Where the agent listens unless configured otherwise.
DEFAULT_SOCKET = "/run/luks-agent/agent.sock"


class AgentError(Exception):
    """The agent answered with an error, or could not be asked.

    ``code`` is the agent's stable error code (``format_refused``,
    ``wrong_key``, ...), or one of this client's own: ``agent_unavailable``
    (nothing listens on the socket), ``agent_timeout``, ``agent_protocol``
    (an answer that is not the API's).
    """

    def __init__(self, code: str, message: str, status: Optional[int] = None,
                 volume_id: Optional[str] = None) -> None:
        self.code = code
        self.status = status
        self.message = message
        self.volume_id = volume_id
        where = f"HTTP {status} " if status else ""
        super().__init__(f"luks-agent: {where}{code}: {message}")


class AgentUnavailable(AgentError):
    """Nothing answers on the agent's socket (not running, or no access)."""


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection to a Unix socket instead of a TCP port."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("luks-agent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """Volume operations through the agent listening on ``socket_path``."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 600.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                try:
                    conn.request(method, path, body=payload, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    # The agent may answer from the request's head alone (a
                    # caller it does not allow) and close before the body
                    # is sent; its answer is still there to read.
                    pass
                resp = conn.getresponse()
                raw = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise AgentUnavailable(
                    "agent_unavailable",
                    f"no agent answers on {self.socket_path} ({e.strerror}); "
                    "is luks-agent serve running? (never falling back to cryptsetup)",
                ) from None
            except PermissionError:
                raise AgentUnavailable(
                    "agent_unavailable",
                    f"no permission to connect to {self.socket_path}: add this "
                    "service's user to the socket's group (luks-agent)",
                ) from None
            except socket.timeout:
                raise AgentError(
                    "agent_timeout",
                    f"no answer from the agent on {self.socket_path} within {self.timeout:g} s",
                ) from None
            except (OSError, http.client.HTTPException) as e:
                raise AgentError(
                    "agent_protocol",
                    f"talking to the agent on {self.socket_path}: {type(e).__name__}: {e}",
                ) from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw.decode())
        except ValueError:
            raise AgentError(
                "agent_protocol",
                f"the agent on {self.socket_path} answered HTTP {resp.status} with a body that is not JSON",
                status=resp.status,
            ) from None
        if resp.status != 200:
            err = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(err, dict):
                raise AgentError("agent_protocol",
                                 f"HTTP {resp.status} without an error body", status=resp.status)
            raise AgentError(str(err.get("code", "unknown")), str(err.get("message", "")),
                             status=resp.status, volume_id=err.get("volume_id"))
        if not isinstance(answer, dict):
            raise AgentError("agent_protocol", "the answer is not a JSON object", status=resp.status)
        return answer

    def volume_op(self, op: str, volume_id: str, body: Dict[str, Any]) -> Dict[str, Any]:
        """``POST /v1/volumes/{volume_id}/{op}`` with ``body``; the answer."""
        vid = urllib.parse.quote(volume_id, safe="")
        return self._call("POST", f"/v1/volumes/{vid}/{op}", body)

    def health(self) -> Dict[str, Any]:
        """``GET /healthz``."""
        return self._call("GET", "/healthz")
