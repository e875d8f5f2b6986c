"""The os-brick plug-in against a real ``luks-agent serve``, driven by the
real os-brick 7.1.1 and nova 34.0.0 code (the nova venv of
``tests/harness/pyvenv.sh nova``).

Which modes run is ``LUKS_AGENT_TEST_MODES`` (comma-separated): ``libvirt``
on the host (a real libvirtd, started by ``tests/harness/libvirtd.sh``),
``dm`` in the guest of the VM tier (real dm-crypt; nova's host object is
libvirt's in-process test driver there, no libvirtd). Root, and
``LUKS_AGENT_BIN``, the agent binary. Run through ``run.sh``.

Every test checks the device, the mapping or the libvirt secret itself,
not only what the plug-in returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Any, Dict, Iterator, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "vm"))

import osbrick_driver  # noqa: E402  (os-brick driven as nova does)

BIN = os.environ.get("LUKS_AGENT_BIN", os.path.join(REPO, "target", "release", "luks-agent"))
MODES = [m for m in os.environ.get("LUKS_AGENT_TEST_MODES", "libvirt").split(",") if m]
PROVIDER = {"luks": "luks_agent_os_brick.encryptors.LuksEncryptor",
            "luks2": "luks_agent_os_brick.encryptors.Luks2Encryptor",
            "plain": "luks_agent_os_brick.encryptors.PlainEncryptor"}
MIB = 1 << 20
NOVA_ROOT_HELPER = "sudo nova-rootwrap /etc/nova/rootwrap.conf"


def run(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Runs a command; its output is returned, and shown when it fails."""
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Agent:
    """A ``luks-agent serve`` with a local key store in a temporary
    directory, and the plug-in's settings file pointing at it."""

    def __init__(self, mode: str, server_extra: str = "") -> None:
        self.dir = tempfile.mkdtemp(prefix="luks-agent-plugin.")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "agent.sock")
        self.config = os.path.join(self.dir, "agent.toml")
        with open(self.config, "w") as f:
            f.write(f'state_dir = "{self.dir}/state"\nrun_dir = "{self.dir}/run"\n'
                    f'[key_manager.local]\ndir = "{self.dir}/keys"\n'
                    f'[server]\nsocket = "{self.socket}"\n{server_extra}\n'
                    '[libvirt]\nuri = "qemu:///system"\n')
        os.chmod(self.config, 0o600)
        self.settings = os.path.join(self.dir, "os-brick.conf")
        self.write_settings(mode)
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        self.proc: Optional[subprocess.Popen] = None

    def write_settings(self, mode: str, socket: Optional[str] = None) -> None:
        with open(self.settings, "w") as f:
            f.write(f"[agent]\nsocket = {socket or self.socket}\nmode = {mode}\ntimeout = 120\n")
        os.environ["LUKS_AGENT_OS_BRICK_CONF"] = self.settings

    def start(self) -> "Agent":
        self.proc = subprocess.Popen([BIN, "--config", self.config, "serve"],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the agent did not start: " + self.read_log())
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.proc = None

    def read_log(self) -> str:
        with open(os.path.join(self.dir, "agent.log")) as f:
            return f.read()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(BIN, "--config", self.config, *args, check=check)

    def new_key(self) -> str:
        return self.cli("keys", "create").stdout.strip()

    def key_file(self, key_id: str) -> str:
        return os.path.join(self.dir, "keys", key_id)

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Volume:
    """A volume's device: a loop device (dm mode) or an image file
    (libvirt mode) behind an os-brick-style symlink."""

    def __init__(self, base: str, name: str, mode: str, size: int = 32 * MIB) -> None:
        self.id = f"{name}-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.image = os.path.join(base, f"{self.id}.img")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.loop = None
        target = self.image
        if mode == "dm":
            self.loop = run("losetup", "--find", "--show", self.image).stdout.strip()
            target = self.loop
        self.target = target
        os.makedirs("/dev/disk/by-id", exist_ok=True)
        self.link = f"/dev/disk/by-id/os-brick+{self.id}"
        if os.path.lexists(self.link):
            os.unlink(self.link)
        os.symlink(target, self.link)

    def connection_info(self) -> Dict[str, Any]:
        """What nova holds for an attached iSCSI or local volume."""
        return {"driver_volume_type": "iscsi", "serial": self.id,
                "data": {"volume_id": self.id, "device_path": self.link}}

    def grow(self, size: int) -> None:
        with open(self.image, "r+b") as f:
            f.truncate(size)
        if self.loop:
            run("losetup", "-c", self.loop)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.link)
        if self.loop:
            run("dmsetup", "remove", f"crypt-os-brick+{self.id}", check=False)
            run("losetup", "-d", self.loop, check=False)
        with contextlib.suppress(OSError):
            os.unlink(self.image)


def encryption(provider: str, key_id: str) -> Dict[str, Any]:
    """cinder's encryption metadata for a volume type naming our class."""
    return {"provider": PROVIDER[provider], "control_location": "front-end",
            "cipher": "aes-xts-plain64", "key_size": 256, "encryption_key_id": key_id}


def secret_of(volume_id: str) -> Optional[str]:
    """The UUID of libvirt's secret with usage volume/``volume_id``."""
    import libvirt
    conn = libvirt.open("qemu:///system")
    try:
        return conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_VOLUME, volume_id).UUIDString()
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def mapped(volume: Volume) -> bool:
    return run("dmsetup", "info", f"crypt-os-brick+{volume.id}", check=False).returncode == 0


class Context:
    """The part of nova's RequestContext the plug-in reads."""

    def __init__(self, token: Optional[str]) -> None:
        self.auth_token = token


def init_nova_config() -> None:
    """nova's configuration with its defaults, as nova-compute has it
    before reading nova.conf (policy and contexts need it parsed)."""
    import nova.conf
    if not getattr(init_nova_config, "done", False):
        nova.conf.CONF([], project="nova", default_config_files=[])
        init_nova_config.done = True  # type: ignore[attr-defined]


def nova_context(token: Optional[str]) -> Any:
    from nova import context as nova_context_mod
    return nova_context_mod.RequestContext(user_id="u", project_id="p", auth_token=token,
                                           is_admin=False)


class PluginTestCase(unittest.TestCase):
    mode = "libvirt"

    @classmethod
    def setUpClass(cls) -> None:
        if os.geteuid() != 0:
            raise AssertionError("the plug-in tests need root (the agent, loop devices, libvirtd)")
        from os_brick import encryptors
        cls.encryptors = encryptors
        init_nova_config()

    def setUp(self) -> None:
        self.agent = Agent(self.mode).start()
        self.addCleanup(self.agent.close)
        self.volumes: List[Volume] = []

    def volume(self, name: str, size: int = 32 * MIB) -> Volume:
        v = Volume(self.agent.dir, name, self.mode, size)
        self.addCleanup(v.close)
        return v

    def brick(self, volume: Volume, enc: Dict[str, Any]) -> Any:
        """os-brick's loader with exactly nova's arguments
        (``LibvirtDriver._get_volume_encryptor``)."""
        return self.encryptors.get_volume_encryptor(
            root_helper=NOVA_ROOT_HELPER, keymgr=object(),
            connection_info=volume.connection_info(), **enc)

    def assert_attached(self, volume: Volume) -> None:
        if self.mode == "dm":
            self.assertEqual(os.readlink(volume.link), f"/dev/mapper/crypt-os-brick+{volume.id}")
            self.assertTrue(mapped(volume))
        else:
            self.assertIsNotNone(secret_of(volume.id), "no libvirt secret for the volume")

    def assert_detached(self, volume: Volume) -> None:
        if self.mode == "dm":
            self.assertFalse(mapped(volume), "mapping left")
            self.assertEqual(os.readlink(volume.link), volume.target)
        else:
            self.assertIsNone(secret_of(volume.id), "libvirt secret left")

    # -- os-brick's loader and the plug-in's three calls ------------------

    def test_os_bricks_loader_attaches_extends_and_detaches(self) -> None:
        from luks_agent_os_brick import encryptors as ours
        key = self.agent.new_key()
        v = self.volume("brick")
        enc = encryption("luks", key)
        e = self.brick(v, enc)
        self.assertIsInstance(e, ours.LuksEncryptor)
        e.attach_volume(Context("user-token"), **enc)
        self.assert_attached(v)
        header = run(BIN, "luks", "dump", "--json", v.target).stdout
        self.assertEqual(json.loads(header)["version"], 1, header)
        # Attach again: the same mapping or secret, nothing formatted.
        e.attach_volume(Context("user-token"), **enc)
        self.assert_attached(v)
        v.grow(48 * MIB)
        size = e.extend_volume(Context("user-token"), **enc)
        data_offset = json.loads(header)["data_offset_bytes"]
        self.assertIsInstance(size, int)
        self.assertEqual(size, 48 * MIB - data_offset)
        e.detach_volume(**enc)
        self.assert_detached(v)
        e.detach_volume(**enc)

    # -- nova's own driver code -------------------------------------------

    def nova_driver(self) -> Any:
        """A LibvirtDriver with just what the encryptor paths use: a host
        object with a real libvirt connection (libvirtd's, or libvirt's
        in-process test driver in the guest, which has no libvirtd)."""
        from nova.virt.libvirt import driver as libvirt_driver
        from nova.virt.libvirt import host as libvirt_host
        drv = libvirt_driver.LibvirtDriver.__new__(libvirt_driver.LibvirtDriver)
        uri = "qemu:///system" if self.mode == "libvirt" else "test:///default"
        drv._host = libvirt_host.Host(uri)
        drv._volume_api = None
        return drv

    def test_novas_attach_detach_and_extend_code(self) -> None:
        drv = self.nova_driver()
        key = self.agent.new_key()
        v = self.volume("nova")
        enc = encryption("luks" if self.mode == "libvirt" else "luks2", key)
        ci = v.connection_info()
        ctx = nova_context("user-token")
        self.assertFalse(drv._allow_native_luksv1(enc), "nova took our provider for its own")
        drv._attach_encryptor(ctx, ci, enc)
        self.assert_attached(v)
        if self.mode == "libvirt":
            # nova's own disk config finds the agent's secret and makes
            # QEMU decrypt natively.
            from nova.virt.libvirt.volume import volume as nova_volume
            conf = nova_volume.LibvirtVolumeDriver(drv._host).get_config(
                ci, {"bus": "virtio", "dev": "vdb", "type": "disk"})
            xml = conf.to_xml()
            self.assertIn('<encryption format="luks">', xml)
            self.assertIn(f'uuid="{secret_of(v.id)}"', xml)
            # With the secret there, nova does not call the encryptor again.
            drv._attach_encryptor(ctx, ci, enc)
        # Extend as nova does for a running guest.
        resized: List[int] = []

        class BlockDevice:
            _disk = v.link

            def resize(self, size: int) -> None:
                resized.append(size)

        v.grow(64 * MIB)
        header = json.loads(run(BIN, "luks", "dump", "--json", v.target).stdout)
        instance = type("Instance", (), {"uuid": "i-1"})()
        drv._resize_attached_encrypted_volume(ctx, 64 * MIB, BlockDevice(), instance, ci, enc)
        self.assertEqual(resized, [64 * MIB - header["data_offset_bytes"]])
        drv._detach_encryptor(ctx, ci, enc)
        self.assert_detached(v)

    def test_host_boot_without_a_token_uses_the_agents_credentials(self) -> None:
        drv = self.nova_driver()
        key = self.agent.new_key()
        v = self.volume("boot")
        enc = encryption("luks", key)
        from nova import context as nova_context_mod
        drv._attach_encryptor(nova_context_mod.get_admin_context(), v.connection_info(), enc)
        self.assert_attached(v)
        drv._detach_encryptor(nova_context_mod.get_admin_context(), v.connection_info(), enc)
        self.assert_detached(v)

    # -- faults --------------------------------------------------------------

    def test_faults_are_exceptions_naming_the_cause_and_leave_nothing(self) -> None:
        from luks_agent_os_brick import encryptors as ours
        from os_brick import exception as brick_exception
        key = self.agent.new_key()
        enc = encryption("luks", key)

        # A device holding a file system: refused, unchanged.
        v = self.volume("ext4")
        run("mkfs.ext4", "-q", "-F", v.target)
        before = sha256(v.image)
        with self.assertRaises(ours.LuksAgentError) as cm:
            self.brick(v, enc).attach_volume(Context("t"), **enc)
        self.assertEqual(cm.exception.agent_code, "format_refused")
        self.assertIn("ext4", str(cm.exception))
        self.assertIn(v.id, str(cm.exception))
        self.assertIsInstance(cm.exception, brick_exception.BrickException)
        self.assertEqual(sha256(v.image), before)
        self.assert_detached(v)

        # A volume formatted with another key: wrong key, nothing mapped.
        other = self.agent.new_key()
        w = self.volume("wrong")
        self.brick(w, encryption("luks", other)).attach_volume(Context("t"), **encryption("luks", other))
        self.brick(w, encryption("luks", other)).detach_volume(**encryption("luks", other))
        with self.assertRaises(ours.LuksAgentError) as cm:
            self.brick(w, enc).attach_volume(Context("t"), **enc)
        self.assertEqual(cm.exception.agent_code, "wrong_key")
        self.assert_detached(w)

        # A caller the agent does not allow: 403, as the error says.
        f = self.volume("forbidden")
        code = self.as_nobody(f, enc)
        self.assertEqual(code.get("agent_code"), "forbidden", code)
        self.assert_detached(f)

        # No device path (an RBD volume): os-brick's own "not supported".
        ci = {"driver_volume_type": "rbd", "serial": "rbd-vol", "data": {"name": "pool/vol"}}
        e = self.encryptors.get_volume_encryptor(root_helper=NOVA_ROOT_HELPER, keymgr=object(),
                                                 connection_info=ci, **enc)
        with self.assertRaises(brick_exception.VolumeEncryptionNotSupported):
            e.attach_volume(Context("t"), **enc)

        # The agent down: an error naming the socket, never a fall-back.
        self.agent.stop()
        d = self.volume("down")
        with self.assertRaises(ours.LuksAgentUnavailable) as cm:
            self.brick(d, enc).attach_volume(Context("t"), **enc)
        self.assertIn(self.agent.socket, str(cm.exception))
        self.assertEqual(cm.exception.agent_code, "agent_unavailable")
        self.assert_detached(d)
        self.assertEqual(sha256(d.image), hashlib.sha256(bytes(32 * MIB)).hexdigest())

    def as_nobody(self, volume: Volume, enc: Dict[str, Any]) -> Dict[str, Any]:
        """The plug-in's attach in a child process running as nobody, with
        the socket reachable (group nogroup) but the caller not allowed."""
        self.agent.stop()
        with open(self.agent.config, "a") as f:
            pass
        text = open(self.agent.config).read().replace(
            "[server]\n", '[server]\nsocket_group = "65534"\n')
        with open(self.agent.config, "w") as f:
            f.write(text)
        self.agent.start()
        # Everything is imported as root (the interpreter may live where
        # nobody cannot read); the connection is made as nobody.
        script = (
            "import json, os, sys\n"
            "from os_brick import encryptors\n"
            "from luks_agent_os_brick import encryptors as ours\n"
            "ci, enc = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
            "class C: auth_token = 't'\n"
            "e = encryptors.get_volume_encryptor(root_helper='sudo', keymgr=object(), connection_info=ci, **enc)\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    e.attach_volume(C(), **enc)\n"
            "    print(json.dumps({}))\n"
            "except ours.LuksAgentError as e:\n"
            "    print(json.dumps({'agent_code': e.agent_code, 'message': str(e)}))\n")
        r = run(sys.executable, "-c", script, json.dumps(volume.connection_info()), json.dumps(enc),
                env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "")))
        return json.loads(r.stdout.strip().splitlines()[-1])


class DmDropIn(unittest.TestCase):
    """dm mode only: a volume attached through the plug-in opens with
    os-brick's own LuksEncryptor afterwards, and the reverse."""

    def setUp(self) -> None:
        self.agent = Agent("dm").start()
        self.addCleanup(self.agent.close)

    def test_drop_in_both_ways_with_os_bricks_own_encryptor(self) -> None:
        from os_brick import encryptors
        for provider in ("luks", "luks2"):
            key = self.agent.new_key()
            km = osbrick_driver.FileKeyManager()
            km.add_key_file(key, self.agent.key_file(key))
            driver = osbrick_driver.Driver(km, execute_mode="direct")
            ours_enc = encryption(provider, key)
            theirs_enc = osbrick_driver.encryption_spec(provider, key)
            for first in ("plugin", "os-brick"):
                v = Volume(self.agent.dir, f"dropin-{provider}-{first}", "dm")
                self.addCleanup(v.close)
                mapping = f"/dev/mapper/crypt-os-brick+{v.id}"
                plugin = encryptors.get_volume_encryptor(
                    root_helper="sudo", keymgr=km, connection_info=v.connection_info(), **ours_enc)
                order = [("plugin", plugin, ours_enc), ("os-brick", None, theirs_enc)]
                if first == "os-brick":
                    order.reverse()
                payload = os.urandom(4096)
                for i, (who, enc_obj, spec) in enumerate(order):
                    if who == "plugin":
                        enc_obj.attach_volume(Context("t"), **spec)
                    else:
                        driver.attach(v.link, spec)
                    self.assertEqual(os.path.realpath(v.link), os.path.realpath(mapping), who)
                    with open(mapping, "r+b") as m:
                        if i == 0:
                            m.write(payload)
                        else:
                            self.assertEqual(m.read(4096), payload,
                                             f"{provider}: {who} does not read what {order[0][0]} wrote")
                    if who == "plugin":
                        enc_obj.detach_volume(**spec)
                    else:
                        driver.detach(v.link, spec)
                        # os-brick leaves the link on the mapping's path.
                        os.unlink(v.link)
                        os.symlink(v.target, v.link)
                    self.assertFalse(mapped(v), f"{who} left the mapping")


class EarlyAnswer(unittest.TestCase):
    """The client reads an answer the agent sends before it has read the
    request body (as it does for a caller it does not allow) and closes:
    the sending side then fails with EPIPE, and the answer must still be
    what the caller sees. A socket that answers from the head alone stands
    in for the agent, so the race always goes the same way."""

    def test_an_answer_sent_before_the_body_was_read_is_the_error(self) -> None:
        from luks_agent_os_brick import client as ours_client
        d = tempfile.mkdtemp(prefix="luks-agent-early.")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "agent.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        self.addCleanup(srv.close)
        body = json.dumps({"error": {"code": "forbidden", "message": "uid 65534 may not call this agent"}}).encode()

        def answer() -> None:
            conn, _ = srv.accept()
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            conn.close()

        t = threading.Thread(target=answer)
        t.start()
        # A body far larger than the socket buffers: most of it is still
        # being sent when the answer comes and the connection closes.
        big = {"device": "/dev/x", "encryption": {"pad": "x" * (8 * MIB)}}
        with self.assertRaises(ours_client.AgentError) as cm:
            ours_client.AgentClient(path, timeout=30).volume_op("attach", "v1", big)
        t.join()
        self.assertEqual(cm.exception.code, "forbidden", str(cm.exception))
        self.assertEqual(cm.exception.status, 403)


class DetachToken(unittest.TestCase):
    """nova calls ``detach_volume(**encryption)`` without a context; the
    request context nova stored for the operation (its own
    ``RequestContext``, through oslo.context's store) gives the user's
    token, which the agent needs to take itself off the key's read ACL. A
    context without a token sends none. A socket that records the request
    stands in for the agent."""

    def detach_body(self) -> Dict[str, Any]:
        from luks_agent_os_brick.encryptors import LuksEncryptor
        d = tempfile.mkdtemp(prefix="luks-agent-detach.")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "agent.sock")
        conf = os.path.join(d, "os-brick.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(f"[agent]\nsocket = {path}\nmode = libvirt\n")
        old = os.environ.get("LUKS_AGENT_OS_BRICK_CONF")
        os.environ["LUKS_AGENT_OS_BRICK_CONF"] = conf
        self.addCleanup(lambda: os.environ.pop("LUKS_AGENT_OS_BRICK_CONF") if old is None
                        else os.environ.__setitem__("LUKS_AGENT_OS_BRICK_CONF", old))
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        self.addCleanup(srv.close)
        seen: Dict[str, Any] = {}

        def agent() -> None:
            conn, _ = srv.accept()
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int([line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")][0])
            while len(rest) < length:
                rest += conn.recv(4096)
            seen["body"] = json.loads(rest)
            answer = json.dumps({"volume_id": "v1", "action": "removed"}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(answer)
                         + answer)
            conn.close()

        t = threading.Thread(target=agent)
        t.start()
        enc = LuksEncryptor(root_helper="sudo", keymgr=None,
                            connection_info={"serial": "v1", "data": {"device_path": "/dev/x"}},
                            encryption_key_id="00000000-0000-0000-0000-0000000000aa")
        enc.detach_volume(provider="luks", control_location="front-end")
        t.join()
        return seen["body"]

    def test_a_users_detach_carries_the_users_token(self) -> None:
        from nova import context as nova_context
        nova_context.RequestContext(user_id="u", project_id="p", is_admin=False,
                                    auth_token="user-token-1")
        self.assertEqual(self.detach_body().get("auth"), {"token": "user-token-1"})

    def test_a_context_without_a_token_sends_none(self) -> None:
        from nova import context as nova_context
        nova_context.RequestContext(user_id="u", project_id="p", is_admin=False,
                                    auth_token=None)
        self.assertNotIn("auth", self.detach_body())


def load_tests(loader: unittest.TestLoader, tests: Any, pattern: Any) -> unittest.TestSuite:
    suite = unittest.TestSuite()
    suite.addTests(loader.loadTestsFromTestCase(EarlyAnswer))
    suite.addTests(loader.loadTestsFromTestCase(DetachToken))
    for mode in MODES:
        cls = type(f"Plugin_{mode}", (PluginTestCase,), {"mode": mode})
        suite.addTests(loader.loadTestsFromTestCase(cls))
    if "dm" in MODES:
        suite.addTests(loader.loadTestsFromTestCase(DmDropIn))
    return suite


if __name__ == "__main__":
    unittest.main()
