"""luks-agent vs os-brick's LUKS encryptors, side by side in one guest run.

Runs inside the VM tier's guest (real dm-crypt) with the os-brick venv's
interpreter; start it with bench/osbrick-vs-agent.sh, which boots the guest.
See bench/README.md ("luks-agent vs os-brick") for what is measured.

Both tools get identical loop devices (sparse files of the same size in the
guest's tmpfs) and keys from the same local key store: luks-agent reads it
itself, os-brick gets a key manager whose key is the same file's bytes
(tests/vm/osbrick_driver.py, driven as nova drives it, privsep daemon
started before any timing, as in a running nova-compute). luks-agent is
measured as the CLI process and as a running `luks-agent serve` (started
before any timing, as on a compute node) called over its Unix socket.

Exit status: 0 when every command behaved, 1 when one failed, 2 on setup
errors. Missed targets are reported as FAIL lines and do not change it.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests', 'vm'))
import osbrick_driver  # noqa: E402

TIME_BIN = '/usr/bin/time'
CONC_RSS_LIMIT_KIB = 64 * 1024
ATTACH_RATIO_TARGET = 50.0
FIRST_USE_PLUGIN_TARGET = 25.0
PLUGIN_CLASS = {'luks': 'luks_agent_os_brick.encryptors.LuksEncryptor',
                'luks2': 'luks_agent_os_brick.encryptors.Luks2Encryptor'}


class TokenContext:
    """The part of nova's RequestContext the plug-in reads."""
    auth_token = None


def log(msg=''):
    print(msg, flush=True)


class BenchError(Exception):
    pass


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = tempfile.mkdtemp(prefix='osbrick-bench-', dir='/tmp')
        self.bin = os.path.abspath(args.bin)
        self.conf = os.path.join(self.work, 'agent.toml')
        with open(self.conf, 'w') as f:
            f.write('state_dir = "%s/state"\n[key_manager.local]\ndir = "%s/keys"\n'
                    % (self.work, self.work))
        os.chmod(self.conf, 0o600)
        # The daemon: same state and key store, its own socket (not the
        # default one, so the CLI above keeps acting in-process).
        self.sock = os.path.join(self.work, 'agent.sock')
        self.dconf = os.path.join(self.work, 'daemon.toml')
        with open(self.dconf, 'w') as f:
            f.write('state_dir = "%s/state"\n[key_manager.local]\ndir = "%s/keys"\n'
                    '[server]\nsocket = "%s"\n' % (self.work, self.work, self.sock))
        os.chmod(self.dconf, 0o600)
        # The os-brick plug-in talks to that daemon, in dm mode.
        self.plugin_conf = os.path.join(self.work, 'os-brick.conf')
        with open(self.plugin_conf, 'w') as f:
            f.write('[agent]\nsocket = %s\nmode = dm\ntimeout = 600\n' % self.sock)
        os.environ['LUKS_AGENT_OS_BRICK_CONF'] = self.plugin_conf
        self.daemon = None
        self.hwm_total = 0  # the daemon's VmHWM over the run, across resets
        self.daemon_log = os.path.join(self.work, 'daemon.log')
        os.makedirs('/dev/disk/by-id', exist_ok=True)
        self.keymgr = osbrick_driver.FileKeyManager()
        self.brick = osbrick_driver.Driver(self.keymgr, 'privsep')
        self.rss_cmds = []
        self.brick_rss = osbrick_driver.Driver(self.keymgr, 'direct')
        self.brick_rss.execute = self._rss_execute
        self.samples = {}   # (scenario, provider, tool) -> [seconds]
        self.rss = {}       # (scenario, provider, tool) -> KiB
        self.failures = []
        self.notes = {}
        self.n = 0

    # ------------------------------------------------------------ plumbing
    def run(self, argv, rss=False):
        """(rc, seconds, stdout, stderr, peak RSS KiB or None)."""
        rssf = None
        if rss:
            fd, rssf = tempfile.mkstemp(dir=self.work)
            os.close(fd)
            argv = [TIME_BIN, '-f', '%M', '-o', rssf, '--'] + list(argv)
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        peak = None
        if rssf:
            try:
                with open(rssf) as f:
                    peak = int(f.read().split()[-1])
            except (OSError, ValueError, IndexError):
                peak = None
            os.unlink(rssf)
        return p.returncode, secs, p.stdout, p.stderr, peak

    def _rss_execute(self, *cmd, **kwargs):
        """processutils.execute under GNU time (as root, no privsep): the
        untimed runs that measure the peak RSS of os-brick's commands."""
        from oslo_concurrency import processutils
        kwargs.pop('run_as_root', None)
        kwargs.pop('root_helper', None)
        fd, rssf = tempfile.mkstemp(dir=self.work)
        os.close(fd)
        try:
            return processutils.execute(TIME_BIN, '-f', '%M', '-o', rssf, *cmd, **kwargs)
        finally:
            try:
                with open(rssf) as f:
                    self.rss_cmds.append((' '.join(str(c) for c in cmd[:2]), int(f.read().split()[-1])))
            except (OSError, ValueError, IndexError):
                pass
            os.unlink(rssf)

    def spawn_floor(self, n=10):
        """Median ms to spawn and reap /bin/true here: the process-start cost
        that every luks-agent (and cryptsetup) run pays under this load."""
        return statistics.median(self.run(['/bin/true'])[1] for _ in range(n)) * 1000

    @staticmethod
    def python_hwm():
        """Peak RSS (VmHWM, KiB) of this process (os-brick imported, as in
        nova-compute) and of os-brick's privsep daemon(s)."""
        def hwm(pid):
            try:
                with open('/proc/%s/status' % pid) as f:
                    for line in f:
                        if line.startswith('VmHWM:'):
                            return int(line.split()[1])
            except OSError:
                return None
        daemons = []
        for pid in os.listdir('/proc'):
            if not pid.isdigit():
                continue
            try:
                with open('/proc/%s/cmdline' % pid, 'rb') as f:
                    if b'privsep-helper' in f.read():
                        daemons.append(hwm(pid))
            except OSError:
                pass
        return {'runner_kib': hwm('self'), 'privsep_daemons_kib': daemons}

    def fail(self, what, detail=''):
        self.failures.append({'what': what, 'detail': detail[-2000:]})
        log('  FAILURE: %s %s' % (what, detail.strip()[-600:]))

    def key(self):
        rc, _, out, err, _ = self.run([self.bin, '--config', self.conf, 'keys', 'create'])
        if rc != 0:
            raise BenchError('keys create: ' + err)
        kid = out.strip()
        self.keymgr.add_key_file(kid, os.path.join(self.work, 'keys', kid))
        return kid

    def volume(self):
        """A fresh sparse loop device and the connector's symlink to it."""
        self.n += 1
        img = os.path.join(self.work, 'v%d.img' % self.n)
        with open(img, 'wb') as f:
            f.truncate(self.a.size_mib * 1024 * 1024)
        dev = subprocess.run(['losetup', '--find', '--show', img], capture_output=True,
                             text=True, check=True).stdout.strip()
        link = '/dev/disk/by-id/os-brick+bench%d' % self.n
        self.relink(link, dev)
        return {'img': img, 'dev': dev, 'link': link, 'key': self.key(),
                'vid': 'bench-%d' % self.n, 'map': 'crypt-os-brick+bench%d' % self.n}

    @staticmethod
    def relink(link, dev):
        tmp = link + '.new'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(dev, tmp)
        os.rename(tmp, link)

    def drop(self, v):
        subprocess.run(['losetup', '-d', v['dev']], check=False)
        os.unlink(v['img'])

    def spec(self, provider, v):
        return osbrick_driver.encryption_spec(provider, v['key'])

    def agent_cmd(self, op, provider, v):
        cmd = [self.bin, '--config', self.conf, op, '--volume-id', v['vid'], '--device', v['link'],
               '--encryption', json.dumps(self.spec(provider, v)), '--json']
        return cmd

    def mapped(self, v):
        return os.path.exists('/dev/mapper/' + v['map'])


    # ------------------------------------------------------------ daemon
    def start_daemon(self):
        """`luks-agent serve` on its own socket, as on a compute node; waits
        until /healthz answers. Started before any timing."""
        log_f = open(self.daemon_log, 'w')
        self.daemon = subprocess.Popen([self.bin, '--config', self.dconf, 'serve'],
                                       stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise BenchError('luks-agent serve exited at start: ' + open(self.daemon_log).read()[-600:])
            try:
                if self.api('GET', '/healthz')[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError('luks-agent serve did not answer /healthz')

    def stop_daemon(self):
        if self.daemon and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def daemon_mem(self):
        """(VmRSS, VmHWM) of the daemon in KiB."""
        out = {}
        try:
            with open('/proc/%d/status' % self.daemon.pid) as f:
                for line in f:
                    if line.startswith(('VmRSS:', 'VmHWM:')):
                        out[line.split(':')[0]] = int(line.split()[1])
        except OSError:
            pass
        return out.get('VmRSS'), out.get('VmHWM')

    def reset_daemon_hwm(self):
        """Resets the daemon's VmHWM to its current RSS (clear_refs 5), so
        the next reading is the peak of what follows only (an argon2id
        unlock of os-brick's LUKS2 header before would set it otherwise)."""
        self.hwm_total = max(self.hwm_total, self.daemon_mem()[1] or 0)
        try:
            with open('/proc/%d/clear_refs' % self.daemon.pid, 'w') as f:
                f.write('5')
            return True
        except OSError:
            return False

    def api(self, method, path, body=None):
        """One request on a new connection, as a compute service sends it,
        over a raw socket (a lean client; http.client adds its own cost
        under TCG): (status, body text, seconds from connect to the full
        answer)."""
        data = (body or '').encode()
        req = ('%s %s HTTP/1.1\r\nHost: luks-agent\r\nConnection: close\r\n' % (method, path)).encode()
        if body is not None:
            req += b'Content-Type: application/json\r\nContent-Length: %d\r\n' % len(data)
        req += b'\r\n' + data
        t0 = time.perf_counter()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(600)
            s.connect(self.sock)
            s.sendall(req)
            chunks = []
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        finally:
            s.close()
        secs = time.perf_counter() - t0
        raw = b''.join(chunks)
        head, _, text = raw.partition(b'\r\n\r\n')
        try:
            status = int(head.split(b' ', 2)[1])
        except (IndexError, ValueError):
            raise OSError('bad answer from the agent: %r' % raw[:200])
        if b'transfer-encoding: chunked' in head.lower():
            text = self.unchunk(text)
        return status, text.decode(), secs

    @staticmethod
    def unchunk(b):
        out = b''
        while b:
            size, _, rest = b.partition(b'\r\n')
            n = int(size.split(b';')[0], 16)
            if n == 0:
                break
            out += rest[:n]
            b = rest[n + 2:]
        return out

    def api_body(self, provider, v):
        return json.dumps({'device': v['link'], 'encryption': self.spec(provider, v)})

    # ------------------------------------------------------------ one op
    def agent(self, scen, provider, op, v, expect=None, rss=False):
        rc, secs, out, err, peak = self.run(self.agent_cmd(op, provider, v), rss=rss)
        ok = rc == 0 and (expect is None or expect in out.replace(' ', ''))
        if ok and op == 'attach' and not self.mapped(v):
            ok, err = False, 'no mapping after attach'
        if ok and op == 'detach' and self.mapped(v):
            ok, err = False, 'mapping left after detach'
        if not ok:
            self.fail('agent %s %s %s' % (scen, provider, op), 'rc %d %s %s' % (rc, out, err))
            return False
        self.record(scen, provider, 'agent', secs, peak, rss)
        if not rss:
            try:
                inner = json.loads(out)['duration_ms'] / 1000.0
                self.record(scen, provider, 'agent-inner', inner, None, False)
            except (ValueError, KeyError, TypeError):
                pass
        return True

    def via_api(self, scen, provider, op, v, expect=None):
        """The same operation through the running daemon's API."""
        try:
            st, out, secs = self.api('POST', '/v1/volumes/%s/%s' % (v['vid'], op), self.api_body(provider, v))
        except OSError as e:
            st, out, secs = 0, repr(e), 0
        ok = st == 200 and (expect is None or expect in out.replace(' ', ''))
        err = ''
        if ok and op == 'attach' and not self.mapped(v):
            ok, err = False, 'no mapping after attach'
        if ok and op == 'detach' and self.mapped(v):
            ok, err = False, 'mapping left after detach'
        if not ok:
            self.fail('api %s %s %s' % (scen, provider, op), 'status %d %s %s' % (st, out, err))
            return False
        self.record(scen, provider, 'api', secs, None, False)
        try:
            self.record(scen, provider, 'api-inner', json.loads(out)['duration_ms'] / 1000.0, None, False)
        except (ValueError, KeyError, TypeError):
            pass
        return True

    def osbrick(self, scen, provider, op, v, rss=False):
        d = self.brick_rss if rss else self.brick
        self.rss_cmds = []
        try:
            secs = getattr(d, op)(v['link'], self.spec(provider, v))
        except Exception as e:  # os-brick's own failure, whatever it is
            self.fail('os-brick %s %s %s' % (scen, provider, op), '%s: %s' % (type(e).__name__, e))
            return False
        if op == 'detach':
            # os-brick leaves the symlink on the removed mapping; the
            # connector recreates it at the next connect.
            self.relink(v['link'], v['dev'])
        if (op == 'attach') != self.mapped(v):
            self.fail('os-brick %s %s %s' % (scen, provider, op), 'mapping state wrong')
            return False
        peak = max((k for _, k in self.rss_cmds), default=None) if rss else None
        if rss:
            self.notes.setdefault('osbrick_commands', {})['%s %s %s' % (scen, provider, op)] = \
                sorted(set(c for c, _ in self.rss_cmds))
        self.record(scen, provider, 'os-brick', secs, peak, rss)
        return True

    def plugin(self, scen, provider, op, v):
        """The operation through the os-brick plug-in, in this process, as
        nova calls it: os-brick's loader with the plug-in's class path
        (the encryptor is built anew for every call, as nova does), then
        attach_volume/detach_volume, which ask the running daemon."""
        from os_brick import encryptors
        enc = dict(self.spec(provider, v), provider=PLUGIN_CLASS[provider])
        ci = {'driver_volume_type': 'local', 'serial': v['vid'],
              'data': {'device_path': v['link'], 'volume_id': v['vid']}}
        t0 = time.perf_counter()
        try:
            e = encryptors.get_volume_encryptor(root_helper=self.brick.root_helper, connection_info=ci,
                                                keymgr=self.keymgr, **enc)
            if op == 'attach':
                e.attach_volume(TokenContext(), **enc)
            else:
                e.detach_volume(**enc)
        except Exception as x:  # the plug-in's error, whatever it is
            self.fail('plugin %s %s %s' % (scen, provider, op), '%s: %s' % (type(x).__name__, x))
            return False
        secs = time.perf_counter() - t0
        if (op == 'attach') != self.mapped(v):
            self.fail('plugin %s %s %s' % (scen, provider, op), 'mapping state wrong')
            return False
        self.record(scen, provider, 'plugin', secs, None, False)
        return True

    def record(self, scen, provider, tool, secs, peak, rss):
        k = (scen, provider, tool)
        if rss:
            if peak is not None:
                self.rss[k] = max(self.rss.get(k, 0), peak)
        else:
            self.samples.setdefault(k, []).append(secs)

    # ------------------------------------------------------------ scenarios
    def per_provider(self, provider):
        n = self.a.reps
        log('== %s: first-use attach (format + map), then detach' % provider)
        ours, theirs = [], []
        for i in range(n + 1):           # run 0: untimed, under GNU time (peak RSS; warm-up)
            rss = i == 0
            v = self.volume()
            if self.agent('first-use attach', provider, 'attach', v, '"formatted":true', rss):
                self.agent('detach', provider, 'detach', v, rss=rss)
            ours.append(v)
            if not rss:
                v = self.volume()
                if self.plugin('first-use attach', provider, 'attach', v):
                    self.plugin('detach', provider, 'detach', v)
                ours.append(v)
            v = self.volume()
            if self.osbrick('first-use attach', provider, 'attach', v, rss):
                self.osbrick('detach', provider, 'detach', v, rss)
            theirs.append(v)
            log('  %d/%d' % (i, n))
        self.header_note(provider, 'agent', ours[0])
        self.header_note(provider, 'os-brick', theirs[0])

        log('== %s: attach of an existing volume with our header, then detach' % provider)
        for i, v in enumerate(ours):
            rss = i == 0
            if self.agent('attach, our header', provider, 'attach', v, '"formatted":false', rss):
                self.agent('detach, our header', provider, 'detach', v, rss=rss)
            if not rss and self.via_api('attach, our header', provider, 'attach', v, '"formatted":false'):
                self.via_api('detach, our header', provider, 'detach', v)
            if not rss and self.plugin('attach, our header', provider, 'attach', v):
                self.plugin('detach, our header', provider, 'detach', v)
            if self.osbrick('attach, our header', provider, 'attach', v, rss):
                self.osbrick('detach, our header', provider, 'detach', v, rss)

        log('== %s: attach of an existing volume formatted by os-brick, then detach' % provider)
        for i, v in enumerate(theirs):
            rss = i == 0
            if self.osbrick('attach, os-brick header', provider, 'attach', v, rss):
                self.osbrick('detach, os-brick header', provider, 'detach', v, rss)
            if self.agent('attach, os-brick header', provider, 'attach', v, '"formatted":false', rss):
                self.agent('detach, os-brick header', provider, 'detach', v, rss=rss)
            if not rss and self.via_api('attach, os-brick header', provider, 'attach', v, '"formatted":false'):
                self.via_api('detach, os-brick header', provider, 'detach', v)
            if not rss and self.plugin('attach, os-brick header', provider, 'attach', v):
                self.plugin('detach, os-brick header', provider, 'detach', v)
        for v in ours + theirs:
            self.drop(v)

    def header_note(self, provider, tool, v):
        r = subprocess.run([self.bin, 'luks', 'dump', '--json', v['dev']], capture_output=True, text=True)
        try:
            d = json.loads(r.stdout)
            slots = d['keyslots']
            slot = slots.get('0') if isinstance(slots, dict) else slots[0]
            self.notes.setdefault('headers', {})['%s %s' % (provider, tool)] = {
                'version': d.get('version'), 'kdf': slot.get('kdf'),
                'data_offset_bytes': d.get('data_offset_bytes')}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self.notes.setdefault('headers', {})['%s %s' % (provider, tool)] = r.stdout[:300]

    def concurrent(self, provider):
        c = self.a.concurrency
        log('== %s: %d concurrent luks-agent attaches of %d volumes' % (provider, c, c))
        vols = [self.volume() for _ in range(c)]
        result = {}
        for phase, expect in (('first-use', '"formatted":true'), ('existing', '"formatted":false')):
            procs = []
            t0 = time.perf_counter()
            for v in vols:
                fd, rssf = tempfile.mkstemp(dir=self.work)
                os.close(fd)
                argv = [TIME_BIN, '-f', '%M', '-o', rssf, '--'] + self.agent_cmd('attach', provider, v)
                procs.append((v, rssf, subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True)))
            peaks, ok = [], True
            for v, rssf, p in procs:
                out, err = p.communicate()
                with open(rssf) as f:
                    peaks.append(int(f.read().split()[-1]))
                os.unlink(rssf)
                if p.returncode != 0 or expect not in out.replace(' ', ''):
                    ok = False
                    self.fail('concurrent %s %s attach' % (provider, phase), out + err)
            wall = time.perf_counter() - t0
            maps = [v for v in vols if self.mapped(v)]
            if len(maps) != c:
                ok = False
                self.fail('concurrent %s %s' % (provider, phase), '%d of %d mappings' % (len(maps), c))
            result[phase] = {'ok': ok, 'wall_s': wall, 'max_rss_kib': max(peaks),
                             'sum_rss_kib': sum(peaks), 'median_rss_kib': statistics.median(peaks)}
            log('  %s: %d attaches in %.2f s wall; peak RSS per process max %d KiB, median %d KiB, sum %d KiB'
                % (phase, c, wall, max(peaks), statistics.median(peaks), sum(peaks)))
            for v in vols:
                self.agent('concurrent-cleanup', provider, 'detach', v)
        for v in vols:
            self.drop(v)
        return result


    def concurrent_api(self, provider):
        """The same 32 attaches sent at once to the daemon (one connection
        each), first use then existing; the daemon's RSS is sampled during
        each batch and its VmHWM read after it."""
        c = self.a.concurrency
        log('== %s: %d concurrent attaches through the daemon\'s API' % (provider, c))
        vols = [self.volume() for _ in range(c)]
        result = {}
        for phase, expect in (('first-use', '"formatted":true'), ('existing', '"formatted":false')):
            answers, stop, rss = {}, threading.Event(), []

            def one(v, op):
                try:
                    answers[v['vid']] = self.api('POST', '/v1/volumes/%s/%s' % (v['vid'], op),
                                                 self.api_body(provider, v))
                except OSError as e:
                    answers[v['vid']] = (0, repr(e), 0)

            def sample():
                while not stop.is_set():
                    r, _ = self.daemon_mem()
                    if r:
                        rss.append(r)
                    stop.wait(0.005)
            reset = self.reset_daemon_hwm()
            before, _ = self.daemon_mem()
            sampler = threading.Thread(target=sample)
            sampler.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(v, 'attach')) for v in vols]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            stop.set()
            sampler.join()
            _, hwm = self.daemon_mem()
            ok = True
            for v in vols:
                st, out, _ = answers[v['vid']]
                if st != 200 or expect not in out.replace(' ', ''):
                    ok = False
                    self.fail('api concurrent %s %s attach' % (provider, phase), 'status %d %s' % (st, out))
            maps = [v for v in vols if self.mapped(v)]
            if len(maps) != c:
                ok = False
                self.fail('api concurrent %s %s' % (provider, phase), '%d of %d mappings' % (len(maps), c))
            lat = sorted(a[2] * 1000 for a in answers.values() if a[0] == 200)
            result[phase] = {'ok': ok, 'wall_s': wall, 'daemon_rss_max_sampled_kib': max(rss, default=None),
                             'daemon_hwm_kib': hwm, 'hwm_reset': reset, 'daemon_rss_before_kib': before, 'latency_ms_median': statistics.median(lat) if lat else None,
                             'latency_ms_max': lat[-1] if lat else None}
            log('  %s: %d attaches in %.2f s wall (per request median %.0f ms, max %.0f ms); daemon RSS'
                ' %s KiB before, sampled max %s KiB, peak (VmHWM%s) %s KiB'
                % (phase, c, wall, result[phase]['latency_ms_median'] or 0, result[phase]['latency_ms_max'] or 0,
                   before, result[phase]['daemon_rss_max_sampled_kib'],
                   ', reset before the batch' if reset else ' since start: clear_refs failed', hwm))
            threads = [threading.Thread(target=one, args=(v, 'detach')) for v in vols]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for v in vols:
                st, out, _ = answers[v['vid']]
                if st != 200 or self.mapped(v):
                    self.fail('api concurrent-cleanup %s detach' % provider, 'status %d %s' % (st, out))
        for v in vols:
            self.drop(v)
        return result

    # ------------------------------------------------------------ report
    def med(self, scen, provider, tool):
        s = self.samples.get((scen, provider, tool))
        return statistics.median(s) if s else None

    def report(self, conc, conc_api, providers):
        rows = []
        fmt = '%-24s %-5s %8s %8s %8s %8s %8s %9s %8s %7s %8s %8s %9s %9s'
        log()
        log('SUMMARY (medians of %d runs; times in ms; peak RSS in KiB from one untimed run each;'
            ' os-brick RSS = its largest command)' % self.a.reps)
        log(fmt % ('operation', 'LUKS', 'agent', 'agent-in', 'api', 'api-in', 'plugin', 'os-brick', 'speedup',
                   'spd-in', 'spd-api', 'spd-plug', 'RSS agent', 'RSS brick'))
        ms = lambda x: '%.1f' % (x * 1000) if x else '-'  # noqa: E731
        for provider in providers:
            for scen in ('first-use attach', 'attach, our header', 'attach, os-brick header',
                         'detach, our header', 'detach, os-brick header', 'detach'):
                a, b = self.med(scen, provider, 'agent'), self.med(scen, provider, 'os-brick')
                ai = self.med(scen, provider, 'agent-inner')
                ap = self.med(scen, provider, 'api')
                api_in = self.med(scen, provider, 'api-inner')
                pl = self.med(scen, provider, 'plugin')
                spp = (b / pl) if pl and b else None
                ra, rb = self.rss.get((scen, provider, 'agent')), self.rss.get((scen, provider, 'os-brick'))
                sp = (b / a) if a and b else None
                spi = (b / ai) if ai and b else None
                spa = (b / ap) if ap and b else None
                rows.append({'scenario': scen, 'provider': provider, 'agent_ms': a and a * 1000,
                             'agent_inner_ms': ai and ai * 1000, 'speedup_inner': spi,
                             'api_ms': ap and ap * 1000, 'api_inner_ms': api_in and api_in * 1000,
                             'speedup_api': spa, 'plugin_ms': pl and pl * 1000, 'speedup_plugin': spp,
                             'plugin_samples_ms': [round(x * 1000, 2) for x in self.samples.get((scen, provider, 'plugin'), [])],
                             'osbrick_ms': b and b * 1000, 'speedup': sp,
                             'agent_rss_kib': ra, 'osbrick_rss_kib': rb,
                             'agent_samples_ms': [round(x * 1000, 2) for x in self.samples.get((scen, provider, 'agent'), [])],
                             'api_samples_ms': [round(x * 1000, 2) for x in self.samples.get((scen, provider, 'api'), [])],
                             'osbrick_samples_ms': [round(x * 1000, 2) for x in self.samples.get((scen, provider, 'os-brick'), [])]})
                log(fmt % (scen, provider, ms(a), ms(ai), ms(ap), ms(api_in), ms(pl), ms(b),
                           '%.1fx' % sp if sp else '-', '%.1fx' % spi if spi else '-',
                           '%.1fx' % spa if spa else '-', '%.1fx' % spp if spp else '-', ra or '-', rb or '-'))
        log('agent = `luks-agent attach|detach` process, spawn to exit; agent-in = its own duration_ms'
            ' (no process start);')
        log('api = the same request to a running `luks-agent serve` over its Unix socket, connect to answer;'
            ' api-in = the daemon\'s duration_ms;')
        log('os-brick = attach_volume/detach_volume in a warm process (privsep daemon running);'
            ' speedup = os-brick / agent,')
        log('plugin = the os-brick plug-in in this process as nova calls it (os-brick\'s loader, then'
            ' attach_volume/detach_volume through the daemon);')
        log('spd-in = os-brick / agent-in, spd-api = os-brick / api, spd-plug = os-brick / plugin;'
            ' "detach" = the detach after the first-use attach')
        log()
        targets = []
        for provider in providers:
            for scen, target in (('attach, our header', ATTACH_RATIO_TARGET),
                                 ('first-use attach', FIRST_USE_PLUGIN_TARGET)):
                theirs = self.med('attach, os-brick header' if scen == 'attach, our header' else scen,
                                  provider, 'os-brick')
                pl = self.med(scen, provider, 'plugin')
                r = theirs / pl if pl and theirs else None
                targets.append(('%s: %s through the os-brick plug-in, in-process as nova calls it (%.1f ms)'
                                ' vs os-brick\'s own encryptor (%.1f ms): %.1fx faster, target >= %.0fx'
                                % (provider, scen.replace(', our header', ' of an existing volume'),
                                   (pl or 0) * 1000, (theirs or 0) * 1000, r or 0, target),
                                bool(r and r >= target)))
            pd = self.med('detach, our header', provider, 'plugin')
            bd = self.med('detach, os-brick header', provider, 'os-brick')
            targets.append(('%s: detach through the plug-in %.1f ms vs os-brick %.1f ms: time ratio %.3f,'
                            ' target <= 1.0' % (provider, (pd or 0) * 1000, (bd or 0) * 1000,
                                                (pd / bd) if pd and bd else 0),
                            bool(pd and bd and pd <= bd)))
            b = self.med('attach, os-brick header', provider, 'os-brick')
            for tool, how in (('agent', 'CLI process'), ('api', 'daemon API')):
                a = self.med('attach, our header', provider, tool)
                r = b / a if a and b else None
                extra = ''
                if tool == 'agent':
                    ai = self.med('attach, our header', provider, 'agent-inner')
                    extra = ' (%.1fx without our process start)' % ((b / ai) if ai and b else 0)
                targets.append(('%s: existing-volume attach, our header, %s (%.1f ms) vs os-brick on its own (%.1f ms): '
                                '%.1fx faster%s, target >= %.0fx'
                                % (provider, how, (a or 0) * 1000, (b or 0) * 1000, r or 0, extra,
                                   ATTACH_RATIO_TARGET), bool(r and r >= ATTACH_RATIO_TARGET)))
            for tool, how in (('agent', 'CLI'), ('api', 'API')):
                a = self.med('attach, os-brick header', provider, tool)
                r = a / b if a and b else None
                targets.append(('%s: attach of os-brick-formatted volumes, luks-agent %s %.1f ms vs os-brick %.1f ms: '
                                'time ratio %.3f, target <= 1.0' % (provider, how, (a or 0) * 1000, (b or 0) * 1000,
                                                                    r or 0), bool(r and r <= 1.0)))
        for provider, res in conc.items():
            for phase, c in res.items():
                targets.append(('%s: %d concurrent %s attaches (CLI): per-process peak RSS max %d KiB (sum %d KiB), '
                                'target <= %d KiB each' % (provider, self.a.concurrency, phase, c['max_rss_kib'],
                                                           c['sum_rss_kib'], CONC_RSS_LIMIT_KIB),
                                c['ok'] and c['max_rss_kib'] <= CONC_RSS_LIMIT_KIB))
        for provider, res in conc_api.items():
            for phase, c in res.items():
                peak = max(x for x in (c['daemon_hwm_kib'], c['daemon_rss_max_sampled_kib'], 0) if x is not None)
                targets.append(('%s: %d concurrent %s attaches through the API: daemon peak RSS during the batch'
                                ' %d KiB, target <= %d KiB' % (provider, self.a.concurrency, phase, peak,
                                                               CONC_RSS_LIMIT_KIB),
                                c['ok'] and 0 < peak <= CONC_RSS_LIMIT_KIB))
        for text, ok in targets:
            log('%s %s' % ('PASS' if ok else 'FAIL', text))
        doc = {'ok': not self.failures, 'reps': self.a.reps, 'rows': rows, 'concurrency': conc,
               'concurrency_api': conc_api,
               'targets': [{'text': t, 'pass': ok} for t, ok in targets], 'failures': self.failures,
               'notes': self.notes, 'env': self.env()}
        return doc

    def env(self):
        def out(argv):
            try:
                return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
            except OSError:
                return None
        import importlib.metadata as m
        return {'os_brick': m.version('os-brick'), 'cryptsetup': out(['cryptsetup', '--version']),
                'kernel': platform.release(), 'cpus': os.cpu_count(),
                'mem_kib': int(open('/proc/meminfo').readline().split()[1]),
                'agent': out([self.bin, '--version']), 'size_mib': self.a.size_mib,
                'guest': os.environ.get('VM_GUEST') == '1'}


def main():
    ap = argparse.ArgumentParser(description='luks-agent vs os-brick, in the VM guest')
    ap.add_argument('--reps', type=int, default=5, help='timed repetitions per operation (default 5)')
    ap.add_argument('--concurrency', type=int, default=32, help='volumes attached at once (default 32)')
    ap.add_argument('--size-mib', type=int, default=64, help='loop device size (default 64)')
    ap.add_argument('--bin', default=os.path.join(REPO, 'target', 'release', 'luks-agent'))
    ap.add_argument('--providers', default='luks,luks2')
    ap.add_argument('--json-out', help='also write the result document here')
    a = ap.parse_args()
    if not a.providers or set(a.providers.split(',')) - {'luks', 'luks2'}:
        ap.error('--providers: a comma list of luks and luks2')
    osbrick_driver.quiet_warnings()
    # os-brick logs expected warnings (isLuks on a blank device); keep errors.
    import logging
    logging.basicConfig(stream=sys.stderr, level=logging.ERROR,
                        format='os-brick log: %(levelname)s %(name)s: %(message)s')
    if not os.path.exists('/dev/mapper/control'):
        log('ERROR: no device-mapper here; run bench/osbrick-vs-agent.sh (it boots the VM guest)')
        return 2
    if not os.access(TIME_BIN, os.X_OK):
        log('ERROR: %s (GNU time) missing: apt-get install time' % TIME_BIN)
        return 2
    b = Bench(a)
    log('warming up: os-brick privsep daemon, luks-agent binary')
    t0 = time.perf_counter()
    b.brick.warmup()
    b.run([b.bin, '--version'])
    try:
        b.start_daemon()
    except BenchError as err:
        log('ERROR: %s' % err)
        return 2
    rss0 = b.daemon_mem()
    log('  %.1f s; luks-agent serve running (pid %d, RSS %s KiB)' % (time.perf_counter() - t0, b.daemon.pid, rss0[0]))
    floor0 = b.spawn_floor()
    log('process start floor (/bin/true, median of 10): %.1f ms' % floor0)
    e = b.env()
    log('os-brick %s, %s, kernel %s, %d CPU, %d MiB, loop devices %d MiB, %d reps'
        % (e['os_brick'], e['cryptsetup'], e['kernel'], e['cpus'], e['mem_kib'] // 1024, a.size_mib, a.reps))
    conc, conc_api = {}, {}
    try:
        for provider in a.providers.split(','):
            b.per_provider(provider)
            conc[provider] = b.concurrent(provider)
            conc_api[provider] = b.concurrent_api(provider)
    except BenchError as err:
        log('ERROR: %s' % err)
        b.stop_daemon()
        return 2
    floor1 = b.spawn_floor()
    dmem = b.daemon_mem()
    hwm_total = max(b.hwm_total, dmem[1] or 0)
    b.stop_daemon()
    if b.daemon.returncode != 0:
        b.fail('luks-agent serve', 'exit %s: %s' % (b.daemon.returncode, open(b.daemon_log).read()[-600:]))
    doc = b.report(conc, conc_api, a.providers.split(','))
    doc['env']['daemon_rss_kib'] = {'start': rss0[0], 'end': dmem[0], 'hwm': hwm_total}
    doc['env']['true_spawn_ms'] = {'start': round(floor0, 2), 'end': round(floor1, 2)}
    doc['env']['python_hwm'] = b.python_hwm()
    log('os-brick side, not counted above: this Python process (os-brick imported) peaked at %s KiB,'
        ' its privsep daemon(s) at %s KiB' % (doc['env']['python_hwm']['runner_kib'],
                                             doc['env']['python_hwm']['privsep_daemons_kib']))
    log('process start floor (/bin/true): %.1f ms at the start, %.1f ms at the end' % (floor0, floor1))
    log('luks-agent serve: RSS %s KiB after start, %s KiB at the end, peak (VmHWM) %s KiB over the whole run'
        ' (argon2id unlocks of os-brick\'s LUKS2 header through the API included)' % (rss0[0], dmem[0], hwm_total))
    log()
    log('headers: ' + json.dumps(b.notes.get('headers')))
    text = json.dumps(doc)
    log('BENCH_JSON ' + text)
    if a.json_out:
        with open(a.json_out, 'w') as f:
            json.dump(doc, f, indent=1)
    shutil.rmtree(b.work, ignore_errors=True)
    if b.failures:
        log('%d command failures (see FAILURE lines)' % len(b.failures))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
