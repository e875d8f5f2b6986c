#!/usr/bin/env python3
"""A real Keystone and a real Barbican on 127.0.0.1 for the integration tests.

Both services come from PyPI (pinned in requirements.lock, installed into a
venv outside the repository) and are served by gunicorn on free loopback
ports.  Everything a run creates lives in the state directory given with
--state; `start` writes STATE/cloud.json, which the tests read.

  openstack.py install [--venv DIR]
  openstack.py start --state DIR [--venv DIR] [--timeout S]
                     [--token-expiration S]
  openstack.py stop --state DIR
  openstack.py stop-barbican --state DIR
  openstack.py start-barbican --state DIR [--timeout S]
  openstack.py status --state DIR
  openstack.py token --state DIR [--user alice] [--project NAME]
                     [--app-credential]
  openstack.py create-secret --state DIR --user alice
                             (--payload-hex HEX | --payload-file PATH)
                             [--secret-type symmetric|passphrase|certificate|
                                            opaque] [--bits N]
  openstack.py delete-secret --state DIR --user alice --id UUID

Only the Python standard library is used here; Keystone and Barbican run in
the venv's interpreter.  Every network call carries a timeout.  Requests made
by this script carry the User-Agent "luks-agent-test-harness", so tests that
count lines in keystone-access.log can tell them apart.
"""

import argparse
import base64
import binascii
import contextlib
import errno
import fcntl
import grp
import hashlib
import http.client
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
REQUIREMENTS = HARNESS_DIR / 'requirements.lock'
PINS = {'keystone': '30.0.0', 'barbican': '23.0.0', 'gunicorn': '27.0.1',
        'PyMySQL': '1.2.4'}
DEFAULT_VENV = os.environ.get('LUKS_AGENT_TEST_VENV') or \
    '/var/cache/luks-agent-tests/openstack-venv'
STAMP_NAME = '.luks-agent-harness-stamp'
USER_AGENT = 'luks-agent-test-harness'
REGION = 'RegionOne'
DOMAIN = {'id': 'default', 'name': 'Default'}
APP_CRED_NAME = 'luks-agent-test'
# cloud.json layout and provisioning version; a running cloud of another
# version is replaced by `start` (2: the barbican user has the service role;
# 3: the agent user, and the database in cloud.json).
CLOUD_FORMAT = 3
HTTP_TIMEOUT = 10.0          # seconds, for every request made by this script
PROBE_TIMEOUT = 3.0          # seconds, for one readiness probe
STOP_GRACE = 10.0            # seconds between SIGTERM and SIGKILL
SERVICES = ('keystone', 'barbican')

# Names created inside the state directory; a fresh `start` removes exactly
# these and nothing else.
STATE_ENTRIES = (
    'keystone', 'barbican', 'cloud.json', 'cloud.json.tmp',
    'keystone.pid', 'barbican.pid',
    'keystone.log', 'keystone-access.log', 'keystone-manage.log',
    'barbican.log', 'barbican-access.log', 'barbican-manage.log',
    'mariadb',
)
# The database of both services: MariaDB (a private server, as production
# runs them on a real database) or SQLite (quicker to start).
DATABASES = ('mariadb', 'sqlite')
DEFAULT_DATABASE = os.environ.get('LUKS_AGENT_TEST_DB') or 'mariadb'


class HarnessError(Exception):
    """A failure to report on stderr; `logs` are tailed after the message."""

    def __init__(self, message, logs=()):
        super().__init__(message)
        self.logs = list(logs)


def note(msg):
    print('openstack.py: ' + msg, file=sys.stderr, flush=True)


def tail(path, lines=40):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode('utf-8', 'replace')
    except OSError as e:
        return '(cannot read %s: %s)' % (path, e)
    return '\n'.join(data.splitlines()[-lines:])


# --------------------------------------------------------------------------
# HTTP (stdlib only, no proxies, no redirects, always a timeout)

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                      _NoRedirect())


def request(method, url, body=None, headers=None, timeout=HTTP_TIMEOUT):
    """Returns (status, headers, body bytes); HTTP errors are returned too."""
    hdrs = {'User-Agent': USER_AGENT, 'Accept': 'application/json'}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs['Content-Type'] = 'application/json'
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        try:
            payload = e.read()
        except (OSError, http.client.HTTPException):
            payload = b''
        return e.code, e.headers, payload


def http_json(method, url, body=None, token=None, expect=(200,),
              timeout=HTTP_TIMEOUT):
    headers = {'X-Auth-Token': token} if token else {}
    try:
        status, hdrs, payload = request(method, url, body, headers, timeout)
    except (OSError, http.client.HTTPException) as e:
        raise HarnessError('%s %s: %s' % (method, url, e))
    if status not in expect:
        raise HarnessError('%s %s -> HTTP %d: %s' % (
            method, url, status, payload.decode('utf-8', 'replace')[:2000]))
    if payload and 'json' in (hdrs.get('Content-Type') or ''):
        return hdrs, json.loads(payload)
    return hdrs, None


# --------------------------------------------------------------------------
# Keystone API

def _project_scope(project, domain_id='default'):
    return {'project': {'name': project, 'domain': {'id': domain_id}}}


def password_token(auth_url, user, password, project=None):
    auth = {'identity': {'methods': ['password'], 'password': {'user': {
        'name': user, 'domain': {'id': DOMAIN['id']}, 'password': password}}}}
    if project:
        auth['scope'] = _project_scope(project)
    hdrs, _ = http_json('POST', auth_url + '/auth/tokens', {'auth': auth},
                        expect=(201,))
    return hdrs['X-Subject-Token']


def app_credential_token(auth_url, cred_id, cred_secret):
    auth = {'identity': {'methods': ['application_credential'],
                         'application_credential': {'id': cred_id,
                                                    'secret': cred_secret}}}
    hdrs, _ = http_json('POST', auth_url + '/auth/tokens', {'auth': auth},
                        expect=(201,))
    return hdrs['X-Subject-Token']


def provision(cloud):
    """Creates projects, users, roles, the key-manager service and alice's
    application credential, through Keystone's API as the bootstrap admin."""
    ks = cloud['keystone']['auth_url']
    users = cloud['users']
    admin = password_token(ks, 'admin', users['admin']['password'], 'admin')

    def get_one(path, key, name):
        _, body = http_json('GET', '%s/%s?name=%s' % (ks, path, name),
                            token=admin)
        found = body[key]
        if len(found) != 1:
            raise HarnessError('expected one %s named %r, found %d'
                               % (key, name, len(found)))
        return found[0]['id']

    roles = {r: get_one('roles', 'roles', r)
             for r in ('admin', 'member', 'reader', 'service')}
    projects = cloud['projects']
    projects['admin']['id'] = get_one('projects', 'projects', 'admin')
    for name in ('proj-a', 'proj-b', 'service'):
        _, body = http_json('POST', ks + '/projects', {'project': {
            'name': name, 'domain_id': DOMAIN['id'],
            'description': 'luks-agent integration tests'}},
            token=admin, expect=(201,))
        projects[name]['id'] = body['project']['id']

    users['admin']['id'] = get_one('users', 'users', 'admin')
    users['admin']['project_id'] = projects['admin']['id']
    for name, info in users.items():
        if name == 'admin':
            continue
        info['project_id'] = projects[info['project']]['id']
        _, body = http_json('POST', ks + '/users', {'user': {
            'name': name, 'domain_id': DOMAIN['id'],
            'password': info['password'],
            'default_project_id': info['project_id']}},
            token=admin, expect=(201,))
        info['id'] = body['user']['id']
        for role in info['roles']:
            http_json('PUT', '%s/projects/%s/users/%s/roles/%s' % (
                ks, info['project_id'], info['id'], roles[role]),
                token=admin, expect=(204,))

    bb = cloud['barbican']
    _, body = http_json('POST', ks + '/services', {'service': {
        'type': bb['service_type'], 'name': 'barbican',
        'description': 'Key Manager'}}, token=admin, expect=(201,))
    bb['service_id'] = body['service']['id']
    for interface in bb['interfaces']:
        http_json('POST', ks + '/endpoints', {'endpoint': {
            'service_id': bb['service_id'], 'interface': interface,
            'url': bb['endpoint'], 'region_id': REGION}},
            token=admin, expect=(201,))

    alice = users['alice']
    alice_token = password_token(ks, 'alice', alice['password'], 'proj-a')
    _, body = http_json('POST', '%s/users/%s/application_credentials' % (
        ks, alice['id']), {'application_credential': {
            'name': APP_CRED_NAME, 'roles': [{'name': 'member'}],
            'description': 'luks-agent integration tests'}},
        token=alice_token, expect=(201,))
    cred = body['application_credential']
    cloud['app_credential'] = {
        'id': cred['id'], 'name': cred['name'], 'secret': cred['secret'],
        'user': 'alice', 'user_id': alice['id'],
        'user_domain_id': DOMAIN['id'], 'project': 'proj-a',
        'project_id': projects['proj-a']['id'], 'roles': ['member']}


# --------------------------------------------------------------------------
# venv

def _stamp_text():
    h = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    return 'requirements.lock sha256 %s\npython %d.%d\n' % (
        h, sys.version_info[0], sys.version_info[1])


def _venv_ok(venv):
    stamp = venv / STAMP_NAME
    try:
        if stamp.read_text() != _stamp_text():
            return False
    except OSError:
        return False
    for exe in ('python', 'gunicorn', 'keystone-manage'):
        if not os.access(venv / 'bin' / exe, os.X_OK):
            return False
    try:
        subprocess.run([str(venv / 'bin' / 'python'), '-c', ''],
                       check=True, timeout=60, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@contextlib.contextmanager
def flock(path, timeout=None):
    """An exclusive flock on `path`; waits at most `timeout` s (None: no
    bound) and then proceeds without it when `timeout` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            end = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > end:
                        raise HarnessError('timed out after %.0f s waiting '
                                           'for lock %s' % (timeout, path))
                    time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def ensure_installed(venv):
    """Creates `venv` and installs requirements.lock into it unless the stamp
    says that exact set is already there.  Returns True if it did work."""
    venv = Path(venv).absolute()
    if _venv_ok(venv):
        return False
    with flock(venv.parent / (venv.name + '.lock'), timeout=1800):
        if _venv_ok(venv):
            return False
        (venv / STAMP_NAME).unlink(missing_ok=True)
        python = venv / 'bin' / 'python'
        if venv.exists() and not _runs(python):
            if not (venv / 'pyvenv.cfg').exists():
                raise HarnessError('%s exists and is not a venv; refusing '
                                   'to touch it' % venv)
            note('removing broken venv %s' % venv)
            shutil.rmtree(venv)
        if not venv.exists():
            note('creating venv %s' % venv)
            r = subprocess.run([sys.executable, '-m', 'venv', str(venv)],
                               stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                raise HarnessError(
                    'python3 -m venv failed (on Debian install python3-venv):'
                    '\n' + r.stdout + r.stderr)
        note('installing %s into %s' % (
            ' '.join('%s==%s' % kv for kv in PINS.items()), venv))
        r = subprocess.run(
            [str(python), '-m', 'pip', 'install',
             '--disable-pip-version-check', '--no-input', '--quiet',
             '-r', str(REQUIREMENTS)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=1800)
        if r.returncode != 0:
            raise HarnessError('pip install failed:\n' + r.stdout[-4000:]
                               + r.stderr[-4000:])
        check = ('import importlib.metadata as m, json, sys; '
                 'print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))')
        r = subprocess.run([str(python), '-c', check] + list(PINS),
                           stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=120)
        got = json.loads(r.stdout) if r.returncode == 0 else {}
        if got != PINS:
            raise HarnessError('venv has %r, wanted %r\n%s'
                               % (got, PINS, r.stderr))
        (venv / STAMP_NAME).write_text(_stamp_text())
        return True


def _runs(python):
    try:
        return subprocess.run([str(python), '-c', ''], timeout=60,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# --------------------------------------------------------------------------
# processes

def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(('127.0.0.1', 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port, timeout=1.0):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout):
            return True
    except OSError:
        return False


def _proc_stat(pid):
    """(state, pgid) of a process, or None when it is gone."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(')') + 2:].split()
    return fields[0], int(fields[2])


def _cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
    except OSError:
        return ''


def _gunicorn_title(service, port):
    return '%s-test-%d' % (service, port)


def is_our_gunicorn(pid, service, port):
    """True when `pid` is alive and is the gunicorn master started for
    `service` on `port` (guards against recycled pids)."""
    st = _proc_stat(pid)
    if st is None or st[0] == 'Z':
        return False
    cmd = _cmdline(pid)
    return 'gunicorn' in cmd and (
        _gunicorn_title(service, port) in cmd
        or '127.0.0.1:%d' % port in cmd)


def group_members(pgid):
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st and st[1] == pgid and st[0] != 'Z':
                out.append(int(entry))
    return out


def kill_groups(pgids, grace=STOP_GRACE):
    """SIGTERM the process groups, SIGKILL what is left after `grace` s.
    Returns the groups that still have live members."""
    left = set(pgids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = {g for g in left if group_members(g)}
        for g in left:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while left and time.monotonic() < end:
            _reap()
            left = {g for g in left if group_members(g)}
            time.sleep(0.05)
    return sorted(left)


def _reap():
    """Reaps children of this process (only `start` has any)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def read_pidfile(state, service):
    try:
        return json.loads((state / (service + '.pid')).read_text())
    except (OSError, ValueError):
        return None


def stop_services(state, services, cloud=None):
    """Stops the services (all at once); idempotent."""
    groups, ports = [], []
    for service in services:
        candidates = []
        info = read_pidfile(state, service)
        if info:
            candidates.append((info['pid'], info['port']))
        if cloud and (cloud.get(service) or {}).get('pid'):
            candidates.append((cloud[service]['pid'], cloud[service]['port']))
        for pid, port in dict.fromkeys(candidates):
            ports.append(port)
            if is_our_gunicorn(pid, service, port):
                note('stopping %s (gunicorn pid %d, port %d)'
                     % (service, pid, port))
                groups.append(pid)
            elif _proc_stat(pid) is None and group_members(pid):
                groups.append(pid)   # master gone, a worker left behind
    left = kill_groups(groups)
    if left:
        raise HarnessError('could not kill process groups %s: %s'
                           % (left, [group_members(g) for g in left]))
    # Once `start` has exited, the masters are children of init; give it a
    # moment to reap them so that no zombie is left behind.
    end = time.monotonic() + 5
    while any(_proc_stat(g) for g in groups) and time.monotonic() < end:
        _reap()
        time.sleep(0.05)
    end = time.monotonic() + 5
    while any(port_open(p, 0.2) for p in ports) and time.monotonic() < end:
        time.sleep(0.05)
    for service in services:
        (state / (service + '.pid')).unlink(missing_ok=True)


def spawn(state, venv, service, port, env_extra, workers=1):
    app = {'keystone': 'keystone_wsgi:application',
           'barbican': 'barbican_wsgi:application'}[service]
    cmd = [str(venv / 'bin' / 'gunicorn'),
           '--bind', '127.0.0.1:%d' % port,
           '--workers', str(workers), '--worker-class', 'gthread',
           '--threads', '4',
           '--no-control-socket',
           '--timeout', '120', '--graceful-timeout', '5',
           '--access-logfile', str(state / (service + '-access.log')),
           '--name', _gunicorn_title(service, port),
           '--pythonpath', str(HARNESS_DIR),
           app]
    env = dict(os.environ)
    env.update(env_extra)
    env['PYTHONDONTWRITEBYTECODE'] = '1'   # no __pycache__ in tests/harness
    env['PYTHONUNBUFFERED'] = '1'
    no_proxy = '127.0.0.1,localhost'
    env['NO_PROXY'] = env['no_proxy'] = no_proxy
    log_path = state / (service + '.log')
    with open(log_path, 'ab') as log:
        offset = log.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(state),
                                env=env, start_new_session=True,
                                close_fds=True)
    (state / (service + '.pid')).write_text(json.dumps(
        {'pid': proc.pid, 'port': port}))
    return {'pid': proc.pid, 'port': port, 'log': log_path,
            'log_offset': offset}


_CRASH_MARKERS = ('exited with code', 'Worker failed to boot',
                  'App failed to load', 'Shutting down: Master')


def wait_http(service, proc, url, deadline, ok):
    """Polls `url` until `ok(status)`, failing fast when gunicorn dies or
    its worker crashes while booting."""
    log = proc['log']
    last = 'no answer'
    while True:
        if not is_our_gunicorn(proc['pid'], service, proc['port']):
            raise HarnessError('%s (gunicorn pid %d) exited during startup'
                               % (service, proc['pid']), [log])
        try:
            with open(log, 'rb') as f:
                f.seek(proc['log_offset'])
                text = f.read().decode('utf-8', 'replace')
        except OSError:
            text = ''
        for marker in _CRASH_MARKERS:
            if marker in text:
                raise HarnessError('%s worker failed to start (%r in %s)'
                                   % (service, marker, log), [log])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HarnessError('%s did not answer %s in time (last: %s)'
                               % (service, url, last), [log])
        try:
            status, _, _ = request('GET', url,
                                   timeout=min(PROBE_TIMEOUT, remaining))
            if ok(status):
                return
            last = 'HTTP %d' % status
        except (OSError, http.client.HTTPException) as e:
            last = str(e)
        time.sleep(0.1)


def barbican_env(cloud):
    return {'HOME': cloud['barbican']['home'],
            'BARBICAN_PASTE_INI': cloud['barbican']['paste_ini']}


def barbican_schema(state, cloud, venv, deadline):
    """Creates Barbican's tables once, before its workers start."""
    log = state / 'barbican-manage.log'
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1', **barbican_env(cloud))
    with open(log, 'ab') as f:
        try:
            r = subprocess.run([str(venv / 'bin' / 'barbican-manage'), 'db',
                                'upgrade'], stdin=subprocess.DEVNULL,
                               stdout=f, stderr=subprocess.STDOUT, env=env,
                               cwd=str(state),
                               timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise HarnessError('barbican-manage db upgrade did not finish in '
                               'time', [log])
    if r.returncode != 0:
        raise HarnessError('barbican-manage db upgrade failed (exit %d)'
                           % r.returncode, [log])


def spawn_barbican(state, cloud, venv):
    bb = cloud['barbican']
    proc = spawn(state, venv, 'barbican', bb['port'],
                 barbican_env(cloud), cloud.get('workers', 1))
    bb['pid'] = proc['pid']
    return proc


def wait_barbican(cloud, proc, deadline):
    bb = cloud['barbican']
    # Unauthenticated version document (300 Multiple Choices).
    wait_http('barbican', proc, bb['endpoint'] + '/', deadline,
              lambda st: st < 500)
    # Authenticated round trip: alice lists her secrets.  This also makes
    # Barbican's auth_token middleware fetch its service token now.
    token = password_token(cloud['keystone']['auth_url'], 'alice',
                           cloud['users']['alice']['password'], 'proj-a')
    while True:
        try:
            status, _, body = request('GET', bb['endpoint'] + '/v1/secrets',
                                      headers={'X-Auth-Token': token})
            if status == 200:
                return
            last = 'HTTP %d: %s' % (status, body[:500])
        except (OSError, http.client.HTTPException) as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise HarnessError('barbican: GET /v1/secrets as alice: %s'
                               % last, [proc['log']])
        time.sleep(0.2)


# --------------------------------------------------------------------------
# state

def load_cloud(state, missing_ok=False):
    path = state / 'cloud.json'
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise HarnessError('%s not found: run `start --state %s` first'
                           % (path, state))


def save_cloud(state, cloud):
    tmp = state / 'cloud.json.tmp'
    tmp.write_text(json.dumps(cloud, indent=2, sort_keys=True) + '\n')
    os.chmod(tmp, 0o600)
    os.replace(tmp, state / 'cloud.json')


def render(template, dest, **values):
    text = string.Template((HARNESS_DIR / template).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text.substitute(**values))


def healthy(cloud):
    db = cloud.get('database') or {}
    if db.get('kind') == 'mariadb' and not db_running(db):
        return False
    for service in SERVICES:
        s = cloud.get(service) or {}
        if not s.get('pid') or not is_our_gunicorn(s['pid'], service,
                                                   s['port']):
            return False
    try:
        status, _, _ = request('GET', cloud['keystone']['auth_url'],
                               timeout=PROBE_TIMEOUT)
        return status == 200
    except (OSError, http.client.HTTPException):
        return False


# --------------------------------------------------------------------------
# MariaDB: a private server in the state directory, on loopback

def db_run(cmd, log, what, timeout=60):
    with open(log, 'ab') as f:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f,
                           stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        raise HarnessError('%s failed (exit %d)' % (what, r.returncode),
                           [log])


def mariadb_start(state, port, deadline):
    """Initialises and starts a MariaDB server of its own (the `mysql` user
    the package creates owns its files when run as root); creates the
    services' databases and a user for them. Returns the `database` entry
    of cloud.json."""
    home = state / 'mariadb'
    data, sock = home / 'data', home / 'mariadb.sock'
    log, pidfile = home / 'mariadb.log', home / 'mariadb.pid'
    home.mkdir()
    log.touch()
    for tool in ('/usr/bin/mariadb-install-db', '/usr/sbin/mariadbd',
                 '/usr/bin/mariadb'):
        if not Path(tool).exists():
            raise HarnessError('MariaDB is not installed (%s is missing; '
                               'scripts/install-deps.sh installs '
                               'mariadb-server)' % tool)
    user = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam('mysql')
        for p in (home, log):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        user = ['--user=mysql']
    db_run(['/usr/bin/mariadb-install-db', '--no-defaults',
            '--datadir=%s' % data, '--auth-root-authentication-method=normal',
            '--skip-test-db'] + user, log, 'mariadb-install-db', timeout=120)
    subprocess.Popen(
        ['/usr/sbin/mariadbd', '--no-defaults', '--datadir=%s' % data,
         '--socket=%s' % sock, '--port=%d' % port,
         '--bind-address=127.0.0.1', '--pid-file=%s' % pidfile,
         '--log-error=%s' % log, '--skip-name-resolve',
         # Keystone and Barbican each keep a pool per worker process.
         '--max-connections=400'] + user,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    while not (sock.exists() and port_open(port)):
        if time.monotonic() > deadline:
            raise HarnessError('mariadbd did not start in time', [log])
        time.sleep(0.1)
    sql = ("CREATE DATABASE keystone; CREATE DATABASE barbican; "
           "CREATE USER 'harness'@'127.0.0.1'; "
           "GRANT ALL ON keystone.* TO 'harness'@'127.0.0.1'; "
           "GRANT ALL ON barbican.* TO 'harness'@'127.0.0.1';")
    db_run(['/usr/bin/mariadb', '--no-defaults', '--socket=%s' % sock,
            '-u', 'root', '-e', sql], log, 'creating the databases')
    db = {'kind': 'mariadb', 'port': port, 'data': str(data),
          'socket': str(sock), 'pid_file': str(pidfile), 'log': str(log)}
    for name in SERVICES:
        db[name] = ('mysql+pymysql://harness@127.0.0.1:%d/%s?charset=utf8mb4'
                    % (port, name))
    return db


def db_pid(state):
    try:
        return int((state / 'mariadb' / 'mariadb.pid').read_text().strip())
    except (OSError, ValueError):
        return None


def db_running(db):
    pid = db_pid(Path(db['data']).parent.parent)
    return bool(pid) and _proc_stat(pid) is not None and port_open(db['port'])


def db_stop(state):
    """Stops the MariaDB server of the state directory, if it runs."""
    pid = db_pid(state)
    if not pid or _proc_stat(pid) is None:
        return
    note('stopping mariadb (pid %d)' % pid)
    left = kill_groups([pid])
    if left:
        raise HarnessError('could not stop mariadbd (pid %d)' % pid)


def run_manage(venv, conf, log, commands, deadline, env=None):
    """keystone-manage COMMAND for each command, all in one interpreter."""
    cmd = [str(venv / 'bin' / 'python'),
           str(HARNESS_DIR / 'keystone_setup.py'), str(conf)] + commands
    child_env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1', **(env or {}))
    with open(log, 'ab') as f:
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f,
                               stderr=subprocess.STDOUT, env=child_env,
                               timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise HarnessError('keystone-manage did not finish in time',
                               [log])
    if r.returncode != 0:
        raise HarnessError('keystone-manage failed (exit %d)' % r.returncode,
                           [log])


# --------------------------------------------------------------------------
# subcommands

def cmd_install(args):
    t0 = time.monotonic()
    did = ensure_installed(args.venv)
    note('%s %s in %.1f s' % ('installed' if did else 'already installed:',
                              Path(args.venv).absolute(),
                              time.monotonic() - t0))


def cmd_start(args):
    state = Path(args.state).absolute()
    state.mkdir(parents=True, exist_ok=True)
    with flock(state / '.lock', timeout=600):
        existing = load_cloud(state, missing_ok=True)
        if existing and existing.get('format') == CLOUD_FORMAT \
                and healthy(existing):
            note('already running (state %s)' % state)
            print(state / 'cloud.json')
            return
        stop_services(state, SERVICES, existing)
        db_stop(state)
        for name in STATE_ENTRIES:
            p = state / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        venv = Path(args.venv).absolute()
        ensure_installed(venv)
        t0 = time.monotonic()
        try:
            _start(state, venv, args, t0)
        except BaseException:
            try:
                stop_services(state, SERVICES)
                db_stop(state)
            except HarnessError as e:
                note(str(e))
            raise


def _start(state, venv, args, t0):
    deadline = t0 + args.timeout
    ks_port, bb_port, db_port = free_ports(3)
    ks_dir, bb_dir = state / 'keystone', state / 'barbican'
    bb_home = bb_dir / 'home'
    me = pwd.getpwuid(os.getuid()).pw_name
    my_group = grp.getgrgid(os.getgid()).gr_name

    cloud = {
        'format': CLOUD_FORMAT,
        'state_dir': str(state),
        'venv': str(venv),
        'region': REGION,
        'domain': dict(DOMAIN),
        'keystone': {
            'auth_url': 'http://127.0.0.1:%d/v3' % ks_port,
            'port': ks_port,
            'config': str(ks_dir / 'keystone.conf'),
            'log': str(state / 'keystone.log'),
            'access_log': str(state / 'keystone-access.log'),
            'manage_log': str(state / 'keystone-manage.log'),
            'token_expiration': args.token_expiration,
        },
        'barbican': {
            'endpoint': 'http://127.0.0.1:%d' % bb_port,
            'port': bb_port,
            'service_type': 'key-manager',
            'interfaces': ['public', 'internal'],
            'config': str(bb_home / '.barbican' / 'barbican.conf'),
            'paste_ini': str(bb_dir / 'barbican-api-paste.ini'),
            'home': str(bb_home),
            'log': str(state / 'barbican.log'),
            'access_log': str(state / 'barbican-access.log'),
        },
        'projects': {name: {'name': name, 'domain_id': DOMAIN['id']}
                     for name in ('admin', 'proj-a', 'proj-b', 'service')},
        'users': {
            name: {'project': project, 'roles': roles}
            for name, project, roles in (
                ('admin', 'admin', ['admin']),
                ('alice', 'proj-a', ['member']),
                ('bob', 'proj-b', ['member']),
                ('rita', 'proj-a', ['reader']),
                # A compute host's agent with no role beyond its own
                # project: it reads a user's key only through the key's ACL.
                ('agent', 'service', ['member']),
                ('barbican', 'service', ['admin', 'service']))},
    }
    for name, info in cloud['users'].items():
        info['name'] = name
        info['domain_id'] = DOMAIN['id']
        info['password'] = secrets.token_urlsafe(18)

    # The database: MariaDB with several workers per service, as
    # production runs them, or SQLite with one.
    if args.db == 'mariadb':
        cloud['database'] = mariadb_start(state, db_port, deadline)
        ks_db, bb_db = cloud['database']['keystone'], cloud['database']['barbican']
        cloud['workers'] = args.workers or 4
    else:
        cloud['database'] = {'kind': 'sqlite'}
        ks_db = 'sqlite:///%s/keystone/keystone.sqlite' % state
        bb_db = 'sqlite:///%s/barbican/barbican.sqlite' % state
        cloud['workers'] = args.workers or 1
    note('database: %s; %d worker(s) per service'
         % (args.db, cloud['workers']))

    # Barbican's config; it boots while Keystone is being bootstrapped (it
    # needs Keystone only when the first authenticated request comes in).
    bb_home.mkdir(parents=True)
    render('barbican.conf.in', Path(cloud['barbican']['config']),
           state=state, barbican_port=bb_port, keystone_port=ks_port,
           barbican_password=cloud['users']['barbican']['password'],
           kek=base64.urlsafe_b64encode(os.urandom(32)).decode(),
           database=bb_db,
           # Several workers must not each create the schema at once.
           db_auto_create='False' if args.db == 'mariadb' else 'True')
    shutil.copyfile(venv / 'etc' / 'barbican' / 'barbican-api-paste.ini',
                    cloud['barbican']['paste_ini'])
    if args.db == 'mariadb':
        barbican_schema(state, cloud, venv, deadline)
    bb_proc = spawn_barbican(state, cloud, venv)

    render('keystone.conf.in', ks_dir / 'keystone.conf', state=state,
           token_expiration=args.token_expiration, database=ks_db)
    conf = ks_dir / 'keystone.conf'
    url = cloud['keystone']['auth_url']
    owner = '--keystone-user %s --keystone-group %s' % (me, my_group)
    # fernet_setup also initializes [fernet_receipts] key_repository.
    run_manage(venv, conf, state / 'keystone-manage.log', [
        'db_sync',
        'fernet_setup ' + owner,
        'credential_setup ' + owner,
        'bootstrap --bootstrap-username admin --bootstrap-project-name admin'
        ' --bootstrap-role-name admin --bootstrap-service-name keystone'
        ' --bootstrap-region-id %s --bootstrap-admin-url %s'
        ' --bootstrap-internal-url %s --bootstrap-public-url %s'
        % (REGION, url, url, url),
    ], deadline,
        env={'OS_BOOTSTRAP_PASSWORD': cloud['users']['admin']['password']})
    t_boot = time.monotonic()

    ks_proc = spawn(state, venv, 'keystone', ks_port,
                    {'OS_KEYSTONE_CONFIG_DIR': str(ks_dir)},
                    cloud['workers'])
    cloud['keystone']['pid'] = ks_proc['pid']
    wait_http('keystone', ks_proc, url, deadline, lambda st: st == 200)
    t_ks = time.monotonic()
    provision(cloud)
    t_prov = time.monotonic()
    wait_barbican(cloud, bb_proc, deadline)
    t_end = time.monotonic()
    cloud['startup_seconds'] = {
        'keystone_manage': round(t_boot - t0, 2),
        'keystone_ready': round(t_ks - t0, 2),
        'provisioned': round(t_prov - t0, 2),
        'total': round(t_end - t0, 2),
    }
    save_cloud(state, cloud)
    note('keystone %s (pid %d), barbican %s (pid %d) ready in %.1f s'
         % (url, ks_proc['pid'], cloud['barbican']['endpoint'],
            bb_proc['pid'], t_end - t0))
    print(state / 'cloud.json')


def cmd_stop(args):
    state = Path(args.state).absolute()
    if not state.is_dir():
        return
    cloud = load_cloud(state, missing_ok=True)
    stop_services(state, SERVICES, cloud)
    db_stop(state)


def cmd_stop_barbican(args):
    state = Path(args.state).absolute()
    with flock(state / '.lock', timeout=600):
        cloud = load_cloud(state)
        stop_services(state, ['barbican'], cloud)
        if port_open(cloud['barbican']['port']):
            raise HarnessError('port %d still accepts connections'
                               % cloud['barbican']['port'])


def cmd_start_barbican(args):
    state = Path(args.state).absolute()
    with flock(state / '.lock', timeout=600):
        cloud = load_cloud(state)
        bb = cloud['barbican']
        if bb.get('pid') and is_our_gunicorn(bb['pid'], 'barbican',
                                             bb['port']):
            note('barbican already running (pid %d)' % bb['pid'])
            return
        # A stray process of a previous instance must not hold the port.
        stop_services(state, ['barbican'], cloud)
        t0 = time.monotonic()
        proc = spawn_barbican(state, cloud, Path(cloud['venv']))
        try:
            wait_barbican(cloud, proc, t0 + args.timeout)
        except BaseException:
            stop_services(state, ['barbican'])
            raise
        save_cloud(state, cloud)
        note('barbican %s (pid %d) ready in %.1f s' % (
            bb['endpoint'], bb['pid'], time.monotonic() - t0))


def cmd_status(args):
    state = Path(args.state).absolute()
    cloud = load_cloud(state)
    out = {}
    for service in SERVICES:
        s = cloud[service]
        out[service] = {'pid': s.get('pid'), 'port': s['port'],
                        'running': bool(s.get('pid')) and is_our_gunicorn(
                            s['pid'], service, s['port'])}
    print(json.dumps(out, indent=2))
    if not all(v['running'] for v in out.values()):
        sys.exit(3)


def user_token(cloud, user, project=None):
    users = cloud['users']
    if user not in users:
        raise HarnessError('unknown user %r (have: %s)'
                           % (user, ', '.join(sorted(users))))
    return password_token(cloud['keystone']['auth_url'], user,
                          users[user]['password'],
                          project or users[user]['project'])


def cmd_token(args):
    cloud = load_cloud(Path(args.state).absolute())
    if args.app_credential:
        c = cloud['app_credential']
        print(app_credential_token(cloud['keystone']['auth_url'],
                                   c['id'], c['secret']))
    else:
        print(user_token(cloud, args.user, args.project))


def store_secret(cloud, token, payload, secret_type='symmetric', bits=None,
                 name='luks-agent-test-key'):
    """Store `payload` (bytes) in Barbican with `token`; returns the UUID.

    Every payload goes as base64 with content type application/octet-stream,
    as castellan's Barbican key manager and `openstack secret store
    --payload-content-type application/octet-stream
    --payload-content-encoding base64` send it (a certificate's payload is
    its PEM text, which castellan turns into DER when it reads it back).
    """
    body = {'name': name, 'secret_type': secret_type,
            'payload': base64.b64encode(payload).decode(),
            'payload_content_type': 'application/octet-stream',
            'payload_content_encoding': 'base64'}
    if secret_type == 'symmetric':
        body['algorithm'] = 'aes'
        body['bit_length'] = bits or 8 * len(payload)
    elif bits:
        body['bit_length'] = bits
    _, resp = http_json('POST', cloud['barbican']['endpoint'] + '/v1/secrets',
                        body, token=token, expect=(201,))
    return resp['secret_ref'].rstrip('/').rsplit('/', 1)[-1]


def cmd_create_secret(args):
    cloud = load_cloud(Path(args.state).absolute())
    if args.payload_file is not None:
        try:
            with open(args.payload_file, 'rb') as f:
                payload = f.read()
        except OSError as e:
            raise HarnessError('--payload-file: %s' % e)
    else:
        try:
            payload = binascii.unhexlify(args.payload_hex)
        except (binascii.Error, ValueError) as e:
            raise HarnessError('--payload-hex: %s' % e)
    if not payload:
        raise HarnessError('empty payload')
    token = user_token(cloud, args.user)
    print(store_secret(cloud, token, payload, args.secret_type, args.bits,
                       args.name))


def cmd_delete_secret(args):
    cloud = load_cloud(Path(args.state).absolute())
    token = user_token(cloud, args.user)
    http_json('DELETE', '%s/v1/secrets/%s' % (cloud['barbican']['endpoint'],
                                              args.id),
              token=token, expect=(204,))


def main(argv=None):
    p = argparse.ArgumentParser(
        description='Real Keystone + Barbican on 127.0.0.1 for tests.')
    sub = p.add_subparsers(dest='cmd', required=True)

    def add(name, fn, state=True, **kw):
        sp = sub.add_parser(name, **kw)
        sp.set_defaults(fn=fn)
        if state:
            sp.add_argument('--state', required=True,
                            help='state directory (configs, DBs, logs, '
                                 'cloud.json)')
        return sp

    sp = add('install', cmd_install, state=False,
             help='create the venv and install the pinned packages')
    sp.add_argument('--venv', default=DEFAULT_VENV)

    sp = add('start', cmd_start, help='start Keystone and Barbican')
    sp.add_argument('--venv', default=DEFAULT_VENV)
    sp.add_argument('--timeout', type=float, default=90.0,
                    help='seconds until both services must answer')
    sp.add_argument('--token-expiration', type=int, default=3600,
                    help='Keystone token lifetime in seconds')
    sp.add_argument('--db', choices=DATABASES, default=DEFAULT_DATABASE,
                    help='database of both services (default %(default)s; '
                    'LUKS_AGENT_TEST_DB sets the default)')
    sp.add_argument('--workers', type=int, default=0,
                    help='gunicorn workers per service (default: 4 on '
                    'MariaDB, 1 on SQLite)')

    add('stop', cmd_stop, help='stop both services (idempotent)')
    add('stop-barbican', cmd_stop_barbican, help='stop Barbican only')
    sp = add('start-barbican', cmd_start_barbican,
             help='start Barbican again on the same port')
    sp.add_argument('--timeout', type=float, default=60.0)
    add('status', cmd_status, help='which services are running')

    sp = add('token', cmd_token, help='print a project-scoped token')
    sp.add_argument('--user', default='alice')
    sp.add_argument('--project', help="default: the user's project")
    sp.add_argument('--app-credential', action='store_true',
                    help="use alice's application credential")

    sp = add('create-secret', cmd_create_secret,
             help='store a secret; prints its UUID')
    sp.add_argument('--user', default='alice')
    payload = sp.add_mutually_exclusive_group(required=True)
    payload.add_argument('--payload-hex')
    payload.add_argument('--payload-file',
                         help='the payload as it is (a certificate: its PEM)')
    sp.add_argument('--secret-type', default='symmetric',
                    choices=('symmetric', 'passphrase', 'certificate',
                             'opaque'))
    sp.add_argument('--bits', type=int,
                    help='bit_length (symmetric default: 8 * payload bytes)')
    sp.add_argument('--name', default='luks-agent-test-key')

    sp = add('delete-secret', cmd_delete_secret, help='delete a secret')
    sp.add_argument('--user', default='alice')
    sp.add_argument('--id', required=True)

    args = p.parse_args(argv)
    try:
        args.fn(args)
    except HarnessError as e:
        note('error: %s' % e)
        for log in e.logs:
            print('--- last lines of %s ---\n%s' % (log, tail(log)),
                  file=sys.stderr)
        sys.exit(1)
    except subprocess.TimeoutExpired as e:
        note('error: %s' % e)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == '__main__':
    main()
