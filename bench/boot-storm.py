#!/usr/bin/env python3
"""Boot storm: several compute hosts attach all their volumes at once
against one Barbican, as after a rack's power returns.

Each host is its own `luks-agent serve` (own configuration, state, run
directory and socket), with the same service user (`agent`, member of the
service project only), all in the libvirt mode against the machine's real
libvirtd, and the real Keystone and Barbican of tests/harness/openstack.py.

1. First boot: every host attaches its volumes at once with the owner's
   token (nova's request context): formats, consumers, read ACLs.
2. Power cut: the agents are killed, their run directories (tmpfs at boot)
   removed, libvirtd restarted (its ephemeral secrets are gone).
3. The storm: the agents start again, and every host attaches all its
   volumes at once without a token (nova resuming guests at host boot).

Reported per phase: attaches, errors, p50/p99/max as the caller measured
them, and, from Keystone's and Barbican's access logs, the requests the
agents made (user agent luks-agent/...) per attach, by kind; the agents'
peak RSS (VmHWM). Nothing is asserted about speed; exit status 1 when an
attach failed, 2 on setup errors. Standard library only; needs root.
"""

import argparse
import base64
import collections
import http.client
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, 'tests', 'harness')
MIB = 1 << 20


def load_harness():
    spec = importlib.util.spec_from_file_location(
        'openstack_harness', os.path.join(HARNESS, 'openstack.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class UnixHTTP(http.client.HTTPConnection):
    """HTTP/1.1 over the agent's Unix socket."""

    def __init__(self, path, timeout=120):
        super().__init__('localhost', timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def call(sock, method, path, body=None):
    """One request; (status, JSON body, seconds)."""
    t = time.monotonic()
    c = UnixHTTP(sock)
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, body=data,
              headers={'Content-Type': 'application/json'})
    r = c.getresponse()
    raw = r.read()
    c.close()
    took = time.monotonic() - t
    try:
        return r.status, json.loads(raw or b'null'), took
    except ValueError:
        return r.status, {'raw': raw.decode(errors='replace')}, took


def healthy(sock):
    try:
        return call(sock, 'GET', '/healthz')[0] == 200
    except OSError:
        return False


class Host:
    """One compute host: an agent with its own files."""

    def __init__(self, root, n, agent_bin, cloud, cap):
        self.dir = os.path.join(root, 'host%d' % n)
        self.name = 'host%d' % n
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, 'agent.sock')
        self.config = os.path.join(self.dir, 'agent.toml')
        self.log = os.path.join(self.dir, 'agent.log')
        self.agent_bin = agent_bin
        self.proc = None
        text = (
            'state_dir = "{d}/state"\nrun_dir = "{d}/run"\n'
            '[key_manager]\nbackend = "barbican"\n'
            '[key_manager.keystone]\nauth_url = "{ks}"\n'
            'auth_type = "password"\nusername = "agent"\n'
            'password = "{pw}"\nproject_name = "service"\n'
            '[key_manager.barbican]\nendpoint = "{bb}"\n'
            '[key_manager.http]\nmax_concurrent_requests = {cap}\n'
            '[libvirt]\nuri = "qemu:///system"\npersistent = false\n'
            '[server]\nsocket = "{sock}"\n'
        ).format(d=self.dir, ks=cloud['keystone']['auth_url'],
                 pw=cloud['users']['agent']['password'],
                 bb=cloud['barbican']['endpoint'], cap=cap, sock=self.sock)
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        self.volumes = []

    def start(self):
        log = open(self.log, 'ab')
        # The host's name in consumers is the kernel's host name; each
        # agent here is told apart by its volumes instead.
        self.proc = subprocess.Popen(
            [self.agent_bin, '--config', self.config, 'serve'],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        end = time.monotonic() + 30
        while not healthy(self.sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit('%s: the agent did not start; see %s'
                                 % (self.name, self.log))
            time.sleep(0.05)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def peak_rss_kib(self):
        try:
            with open('/proc/%d/status' % self.proc.pid) as f:
                for line in f:
                    if line.startswith('VmHWM:'):
                        return int(line.split()[1])
        except OSError:
            pass
        return None


def body(vol, token):
    b = {'device': vol['file'], 'mode': 'libvirt',
         'encryption': {'provider': 'luks', 'control_location': 'front-end',
                        'cipher': 'aes-xts-plain64', 'key_size': 256,
                        'encryption_key_id': vol['key_id']}}
    if token:
        b['auth'] = {'token': token}
    return b


def storm(hosts, op, token):
    """Every volume of every host at once; [(host, vol, status, body, s)]."""
    results, lock = [], threading.Lock()
    start = threading.Barrier(sum(len(h.volumes) for h in hosts))

    def one(h, v):
        start.wait()
        try:
            st, b, took = call(h.sock, 'POST', '/v1/volumes/%s/%s'
                               % (v['id'], op), body(v, token))
        except OSError as e:
            st, b, took = 0, {'error': str(e)}, 0.0
        with lock:
            results.append((h, v, st, b, took))

    threads = [threading.Thread(target=one, args=(h, v))
               for h in hosts for v in h.volumes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


REQUEST = re.compile(r'"([A-Z]+) ([^ "]+)[^"]*" (\d{3})')
UUID = re.compile(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                  r'[0-9a-f]{12}|[0-9a-f]{32}')


def agent_requests(path, since):
    """The agents' requests in an access log after byte `since`, by kind
    (method and path with ids replaced), with their statuses."""
    kinds = collections.Counter()
    statuses = collections.Counter()
    with open(path, 'rb') as f:
        f.seek(since)
        for line in f.read().decode(errors='replace').splitlines():
            if 'luks-agent/' not in line:
                continue
            m = REQUEST.search(line)
            if not m:
                continue
            method, url, status = m.groups()
            kinds['%s %s' % (method, UUID.sub('{id}', url.split('?')[0]))] += 1
            statuses[status] += 1
    return kinds, statuses


def pct(sorted_s, p):
    if not sorted_s:
        return float('nan')
    i = min(len(sorted_s) - 1, max(0, int(round(p / 100 * len(sorted_s))) - 1))
    return sorted_s[i]


def report(title, results, cloud, marks, hosts):
    ok = [r for r in results if r[2] == 200]
    errors = [r for r in results if r[2] != 200]
    times = sorted(r[4] * 1000 for r in ok)
    n = len(results)
    print('== %s: %d attaches on %d hosts' % (title, n, len(hosts)))
    print('   errors: %d' % len(errors))
    for h, v, st, b, _ in errors[:5]:
        print('     %s %s: HTTP %s %s' % (h.name, v['id'], st,
                                        json.dumps(b)[:300]))
    if times:
        print('   latency ms: p50 %.1f  p99 %.1f  max %.1f  (agent p50 %.1f)'
              % (pct(times, 50), pct(times, 99), times[-1],
                 statistics.median(r[3].get('duration_ms', 0) for r in ok)))
    held = sum(1 for r in ok if r[3].get('key_held') is True)
    print('   key held (Barbican consumer registered): %d of %d' % (held, len(ok)))
    out = {'attaches': n, 'errors': len(errors),
           'p50_ms': pct(times, 50), 'p99_ms': pct(times, 99),
           'max_ms': times[-1] if times else None, 'held': held}
    for svc in ('keystone', 'barbican'):
        kinds, statuses = agent_requests(cloud[svc]['access_log'], marks[svc])
        total = sum(kinds.values())
        print('   %s requests: %d (%.2f per attach); statuses %s'
              % (svc, total, total / max(n, 1), dict(sorted(statuses.items()))))
        for k, c in sorted(kinds.items()):
            print('     %-48s %5d  (%.2f per attach)' % (k, c, c / max(n, 1)))
        out[svc] = {'total': total, 'kinds': dict(kinds),
                    'statuses': dict(statuses)}
    rss = [h.peak_rss_kib() for h in hosts]
    rss = [r for r in rss if r]
    if rss:
        print('   agent peak RSS (VmHWM): max %.1f MiB' % (max(rss) / 1024))
        out['peak_rss_mib'] = max(rss) / 1024
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--hosts', type=int, default=4)
    p.add_argument('--volumes', type=int, default=25,
                   help='volumes per host')
    p.add_argument('--cap', type=int, default=16,
                   help='max_concurrent_requests of each agent')
    p.add_argument('--state', default=os.path.join(REPO, 'target', 'bench-cloud'),
                   help='the test cloud state directory (started if needed)')
    p.add_argument('--json', help='also write the figures to this file')
    a = p.parse_args()
    if os.geteuid() != 0:
        print('boot-storm: needs root (libvirtd, the agent)', file=sys.stderr)
        return 2
    h = load_harness()
    subprocess.run(['cargo', 'build', '--release', '--locked', '--quiet'],
                   cwd=REPO, check=True)
    agent_bin = os.path.join(REPO, 'target', 'release', 'luks-agent')
    out = subprocess.run([sys.executable, os.path.join(HARNESS, 'openstack.py'),
                          'start', '--state', a.state],
                         check=True, capture_output=True, text=True).stdout
    cloud_json = out.strip().splitlines()[-1]
    with open(cloud_json) as f:
        cloud = json.load(f)
    subprocess.run([os.path.join(HARNESS, 'libvirtd.sh'), 'start',
                    '--owner', str(os.getpid())], cwd=REPO, check=True)
    root = tempfile.mkdtemp(prefix='luks-agent-storm.')
    hosts = [Host(root, n, agent_bin, cloud, a.cap) for n in range(a.hosts)]
    bb = cloud['barbican']['endpoint']
    token = h.user_token(cloud, 'alice')
    created = []
    failed = False
    try:
        for host in hosts:
            for _ in range(a.volumes):
                key = secrets.token_bytes(32)
                _, resp = h.http_json('POST', bb + '/v1/secrets', {
                    'secret_type': 'symmetric', 'algorithm': 'aes',
                    'bit_length': 256, 'payload': base64.b64encode(key).decode(),
                    'payload_content_type': 'application/octet-stream',
                    'payload_content_encoding': 'base64'},
                    token=token, expect=(201,))
                key_id = resp['secret_ref'].rstrip('/').rsplit('/', 1)[-1]
                created.append(key_id)
                vid = str(__import__('uuid').uuid4())
                path = os.path.join(host.dir, vid + '.img')
                with open(path, 'wb') as f:
                    f.truncate(16 * MIB)
                host.volumes.append({'id': vid, 'file': path, 'key_id': key_id})
        for host in hosts:
            host.start()
        figures = {'hosts': a.hosts, 'volumes_per_host': a.volumes,
                   'max_concurrent_requests': a.cap}
        marks = {s: log_size(cloud[s]['access_log']) for s in ('keystone', 'barbican')}
        first = storm(hosts, 'attach', token)
        time.sleep(0.5)  # access log lines follow the answers
        figures['first_boot'] = report('first boot (user token; formats)',
                                       first, cloud, marks, hosts)
        failed |= any(r[2] != 200 for r in first)

        # The power cut.
        for host in hosts:
            host.kill()
            shutil.rmtree(os.path.join(host.dir, 'run'), ignore_errors=True)
        subprocess.run([os.path.join(HARNESS, 'libvirtd.sh'), 'restart'],
                       cwd=REPO, check=True)
        for host in hosts:
            host.start()
        marks = {s: log_size(cloud[s]['access_log']) for s in ('keystone', 'barbican')}
        second = storm(hosts, 'attach', None)
        time.sleep(0.5)
        figures['boot_storm'] = report(
            'boot storm (no token; the agent\'s own credentials)',
            second, cloud, marks, hosts)
        failed |= any(r[2] != 200 for r in second)

        detached = storm(hosts, 'detach', None)
        bad = [r for r in detached if r[2] != 200]
        print('== detach of all: %d errors' % len(bad))
        failed |= bool(bad)
        if a.json:
            with open(a.json, 'w') as f:
                json.dump(figures, f, indent=1)
    finally:
        for host in hosts:
            host.stop()
        for key_id in created:
            try:
                h.http_json('DELETE', '%s/v1/secrets/%s' % (bb, key_id),
                            token=token, expect=(204,))
            except Exception as e:  # a consumer left behind shows here
                print('cleanup: secret %s: %s' % (key_id, e), file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
