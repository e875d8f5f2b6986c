"""Drives os-brick's volume encryptors exactly as nova's libvirt driver does.

Run with the os-brick venv's interpreter (tests/harness/osbrick.sh), as
root, inside the VM tier's guest (os-brick needs dm-crypt):

  python osbrick_driver.py [--execute privsep|direct] [--verbose] serve
  python osbrick_driver.py [--execute privsep|direct] [--verbose] run \
      --key-file PATH --key-id ID --provider luks|luks2 --device-path LINK \
      OP [OP...]

`serve` answers one JSON request per stdin line (see serve()) from one
long-lived process, as nova-compute is: os-brick is imported and its
privsep daemon started once (importing os-brick alone takes seconds in a
TCG guest). `run` does OPs (`attach`, `detach`) in order on one volume and
prints one JSON line per op: {"op": ..., "seconds": ...}; exit 0 when every
op succeeded, 1 otherwise (the exception on stderr), 2 on an unusable key
file.

nova's path: `encryptors.get_volume_encryptor(root_helper, connection_info,
keymgr, **encryption)` then `encryptor.attach_volume(context, **encryption)`
/ `encryptor.detach_volume(**encryption)`, with connection_info['data']
['device_path'] the connector's symlink to the block device and keymgr
castellan's key manager. Here the key manager is a small object whose get()
returns a symmetric key whose get_encoded() is the raw bytes of the key file
(the local key store's file for that key id: the same 32 bytes luks-agent
uses). The key reaches this process only through that file (mode 0600),
never through argv or the environment.

`--execute privsep` (default) keeps os-brick's own execute: root commands go
through its oslo.privsep daemon, started with the venv's privsep-helper (as
nova's `[privsep_osbrick] helper_command` would). `--execute direct` passes
oslo.concurrency's processutils.execute instead (no daemon).

This module is also imported by bench/osbrick-vs-agent.py.
"""

import argparse
import json
import logging
import os
import stat
import sys
import time
import warnings


class KeyFileError(Exception):
    pass


class SymmetricKey:
    """The part of castellan's SymmetricKey that os-brick uses."""

    def __init__(self, key_bytes):
        self._bytes = bytes(key_bytes)

    def managed_type(self):
        return 'symmetric'

    @property
    def algorithm(self):
        return 'AES'

    @property
    def bit_length(self):
        return len(self._bytes) * 8

    @property
    def format(self):
        return 'RAW'

    def get_encoded(self):
        return self._bytes

    def __repr__(self):
        return '<SymmetricKey %d bits>' % self.bit_length


class FileKeyManager:
    """A key manager holding keys read from 0600 files, by key id."""

    def __init__(self):
        self._keys = {}

    def add_key_file(self, key_id, path):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError('%s is not a regular file' % path)
        if st.st_mode & 0o077:
            raise KeyFileError('%s has mode %o; want 0600' % (path, st.st_mode & 0o777))
        with open(path, 'rb') as f:
            data = f.read()
        if len(data) not in (16, 24, 32, 48, 64):
            raise KeyFileError('%s holds %d bytes, not a symmetric key' % (path, len(data)))
        self._keys[key_id] = SymmetricKey(data)

    def get(self, context, managed_object_id, **kwargs):
        try:
            return self._keys[managed_object_id]
        except KeyError:
            raise KeyError('no key %s' % managed_object_id) from None


def setup_privsep(helper):
    """Points os-brick's privsep context at the venv's privsep-helper."""
    from oslo_config import cfg
    import os_brick.privileged  # noqa: F401  registers [privsep_osbrick]
    cfg.CONF([], project='luks-agent-osbrick-driver', default_config_files=[])
    cfg.CONF.set_override('helper_command', helper, group='privsep_osbrick')


def encryption_spec(provider, key_id):
    """Cinder's encryption metadata as nova passes it."""
    return {'provider': provider, 'control_location': 'front-end',
            'cipher': 'aes-xts-plain64', 'key_size': 256,
            'encryption_key_id': key_id}


class Driver:
    def __init__(self, keymgr, execute_mode='privsep', root_helper='sudo'):
        from os_brick import encryptors
        from oslo_concurrency import processutils
        self._encryptors = encryptors
        self.keymgr = keymgr
        self.root_helper = root_helper
        if execute_mode == 'privsep':
            helper = os.path.join(os.path.dirname(sys.executable), 'privsep-helper')
            setup_privsep(helper)
            self.execute = None
        elif execute_mode == 'direct':
            self.execute = processutils.execute
        else:
            raise ValueError(execute_mode)

    def encryptor(self, device_path, encryption):
        connection_info = {'driver_volume_type': 'local',
                           'data': {'device_path': device_path}}
        return self._encryptors.get_volume_encryptor(
            root_helper=self.root_helper, connection_info=connection_info,
            keymgr=self.keymgr, execute=self.execute, **encryption)

    def warmup(self):
        """Runs `true` as root the way os-brick runs its commands: with the
        privsep execute this starts os-brick's privsep daemon."""
        t0 = time.perf_counter()
        if self.execute is None:
            from os_brick.privileged import rootwrap
            rootwrap.execute('true', run_as_root=True, root_helper=self.root_helper)
        else:
            self.execute('true')
        return time.perf_counter() - t0

    def attach(self, device_path, encryption):
        t0 = time.perf_counter()
        self.encryptor(device_path, encryption).attach_volume(None, **encryption)
        return time.perf_counter() - t0

    def detach(self, device_path, encryption):
        t0 = time.perf_counter()
        self.encryptor(device_path, encryption).detach_volume(**encryption)
        return time.perf_counter() - t0


def serve(driver, inp, out):
    """One JSON request per input line, one JSON answer per output line:
    {"op": "attach"|"detach", "provider", "device_path", "key_id",
    "key_file"} -> {"ok": true, "seconds": S} or {"ok": false, "error": E}.
    The key file is read at each request. {"op": "warmup"} starts the
    privsep daemon (see Driver.warmup)."""
    for line in iter(inp.readline, ''):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req.get('op') == 'warmup':
                secs = driver.warmup()
                out.write(json.dumps({'ok': True, 'seconds': round(secs, 4)}) + '\n')
                out.flush()
                continue
            if req.get('op') not in ('attach', 'detach'):
                raise ValueError('unknown op %r' % req.get('op'))
            driver.keymgr.add_key_file(req['key_id'], req['key_file'])
            enc = encryption_spec(req['provider'], req['key_id'])
            secs = getattr(driver, req['op'])(req['device_path'], enc)
            answer = {'ok': True, 'seconds': round(secs, 4)}
        except Exception as e:  # report os-brick's own failure, whatever it is
            answer = {'ok': False, 'error': '%s: %s' % (type(e).__name__, e)}
        out.write(json.dumps(answer) + '\n')
        out.flush()


def quiet_warnings():
    # oslo.privsep imports eventlet, which warns about its own deprecation.
    warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--execute', choices=('privsep', 'direct'), default='privsep')
    p.add_argument('--verbose', action='store_true', help="log os-brick's commands")
    sub = p.add_subparsers(dest='mode', required=True)
    sub.add_parser('serve', help='answer JSON requests on stdin (one process, like nova-compute)')
    run = sub.add_parser('run', help='run OPs on one volume')
    run.add_argument('--key-file', required=True)
    run.add_argument('--key-id', required=True)
    run.add_argument('--provider', required=True)
    run.add_argument('--device-path', required=True)
    run.add_argument('ops', nargs='+', choices=('attach', 'detach'))
    a = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr,
                        level=logging.DEBUG if a.verbose else logging.ERROR,
                        format='osbrick: %(levelname)s %(name)s: %(message)s')
    quiet_warnings()
    keymgr = FileKeyManager()
    if a.mode == 'run':
        try:
            keymgr.add_key_file(a.key_id, a.key_file)
        except (OSError, KeyFileError) as e:
            print('osbrick_driver: key file: %s' % e, file=sys.stderr)
            return 2
    driver = Driver(keymgr, a.execute)
    if a.mode == 'serve':
        serve(driver, sys.stdin, sys.stdout)
        return 0
    enc = encryption_spec(a.provider, a.key_id)
    for op in a.ops:
        try:
            secs = getattr(driver, op)(a.device_path, enc)
        except Exception as e:  # report os-brick's own failure, whatever it is
            print('osbrick_driver: %s failed: %s: %s' % (op, type(e).__name__, e),
                  file=sys.stderr)
            return 1
        print(json.dumps({'op': op, 'seconds': round(secs, 4)}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
