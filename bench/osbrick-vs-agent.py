"""luks-agent vs os-brick's LUKS encryptors, side by side in one guest run.

Runs inside the VM tier's guest (real dm-crypt) with the os-brick venv's
interpreter; start it with bench/osbrick-vs-agent.sh, which boots the guest.
See bench/README.md ("luks-agent vs os-brick") for what is measured.

Both tools get identical loop devices (sparse files of the same size in the
guest's tmpfs) and keys from the same local key store: luks-agent reads it
itself, os-brick gets a key manager whose key is the same file's bytes
(tests/vm/osbrick_driver.py, driven as nova drives it, privsep daemon
started before any timing, as in a running nova-compute).

Exit status: 0 when every command behaved, 1 when one failed, 2 on setup
errors. Missed targets are reported as FAIL lines and do not change it.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests', 'vm'))
import osbrick_driver  # noqa: E402

TIME_BIN = '/usr/bin/time'
CONC_RSS_LIMIT_KIB = 64 * 1024
ATTACH_RATIO_TARGET = 50.0


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
            if self.osbrick('attach, our header', provider, 'attach', v, rss):
                self.osbrick('detach, our header', provider, 'detach', v, rss)

        log('== %s: attach of an existing volume formatted by os-brick, then detach' % provider)
        for i, v in enumerate(theirs):
            rss = i == 0
            if self.osbrick('attach, os-brick header', provider, 'attach', v, rss):
                self.osbrick('detach, os-brick header', provider, 'detach', v, rss)
            if self.agent('attach, os-brick header', provider, 'attach', v, '"formatted":false', rss):
                self.agent('detach, os-brick header', provider, 'detach', v, rss=rss)
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

    # ------------------------------------------------------------ report
    def med(self, scen, provider, tool):
        s = self.samples.get((scen, provider, tool))
        return statistics.median(s) if s else None

    def report(self, conc, providers):
        rows = []
        fmt = '%-24s %-5s %10s %10s %10s %8s %8s %9s %9s'
        log()
        log('SUMMARY (medians of %d runs; times in ms; peak RSS in KiB from one untimed run each;'
            ' os-brick RSS = its largest command)' % self.a.reps)
        log(fmt % ('operation', 'LUKS', 'agent', 'agent-in', 'os-brick', 'speedup', 'spd-in',
                   'RSS agent', 'RSS brick'))
        for provider in providers:
            for scen in ('first-use attach', 'attach, our header', 'attach, os-brick header',
                         'detach, our header', 'detach, os-brick header', 'detach'):
                a, b = self.med(scen, provider, 'agent'), self.med(scen, provider, 'os-brick')
                ai = self.med(scen, provider, 'agent-inner')
                ra, rb = self.rss.get((scen, provider, 'agent')), self.rss.get((scen, provider, 'os-brick'))
                sp = (b / a) if a and b else None
                spi = (b / ai) if ai and b else None
                rows.append({'scenario': scen, 'provider': provider, 'agent_ms': a and a * 1000,
                             'agent_inner_ms': ai and ai * 1000, 'speedup_inner': spi,
                             'osbrick_ms': b and b * 1000, 'speedup': sp,
                             'agent_rss_kib': ra, 'osbrick_rss_kib': rb,
                             'agent_samples_ms': [round(x * 1000, 2) for x in self.samples.get((scen, provider, 'agent'), [])],
                             'osbrick_samples_ms': [round(x * 1000, 2) for x in self.samples.get((scen, provider, 'os-brick'), [])]})
                ms = lambda x: '%.1f' % (x * 1000) if x else '-'  # noqa: E731
                log(fmt % (scen, provider, ms(a), ms(ai), ms(b), '%.1fx' % sp if sp else '-',
                           '%.1fx' % spi if spi else '-', ra or '-', rb or '-'))
        log('agent = `luks-agent attach|detach` process, spawn to exit; agent-in = its own duration_ms'
            ' (no process start);')
        log('os-brick = attach_volume/detach_volume in a warm process (privsep daemon running);'
            ' speedup = os-brick / agent,')
        log('spd-in = os-brick / agent-in; "detach" = the detach after the first-use attach')
        log()
        targets = []
        for provider in providers:
            a = self.med('attach, our header', provider, 'agent')
            b = self.med('attach, os-brick header', provider, 'os-brick')
            ai = self.med('attach, our header', provider, 'agent-inner')
            r = b / a if a and b else None
            targets.append(('%s: existing-volume attach, our header (%.1f ms, process) vs os-brick on its own (%.1f ms): '
                            '%.1fx faster (%.1fx without our process start), target >= %.0fx'
                            % (provider, (a or 0) * 1000, (b or 0) * 1000, r or 0, (b / ai) if ai and b else 0,
                               ATTACH_RATIO_TARGET), bool(r and r >= ATTACH_RATIO_TARGET)))
            a = self.med('attach, os-brick header', provider, 'agent')
            r = a / b if a and b else None
            targets.append(('%s: attach of os-brick-formatted volumes, luks-agent %.1f ms vs os-brick %.1f ms: '
                            'time ratio %.3f, target <= 1.0' % (provider, (a or 0) * 1000, (b or 0) * 1000, r or 0),
                            bool(r and r <= 1.0)))
        for provider, res in conc.items():
            for phase, c in res.items():
                targets.append(('%s: %d concurrent %s attaches: per-process peak RSS max %d KiB (sum %d KiB), '
                                'target <= %d KiB each' % (provider, self.a.concurrency, phase, c['max_rss_kib'],
                                                           c['sum_rss_kib'], CONC_RSS_LIMIT_KIB),
                                c['ok'] and c['max_rss_kib'] <= CONC_RSS_LIMIT_KIB))
        for text, ok in targets:
            log('%s %s' % ('PASS' if ok else 'FAIL', text))
        doc = {'ok': not self.failures, 'reps': self.a.reps, 'rows': rows, 'concurrency': conc,
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
    log('  %.1f s' % (time.perf_counter() - t0))
    floor0 = b.spawn_floor()
    log('process start floor (/bin/true, median of 10): %.1f ms' % floor0)
    e = b.env()
    log('os-brick %s, %s, kernel %s, %d CPU, %d MiB, loop devices %d MiB, %d reps'
        % (e['os_brick'], e['cryptsetup'], e['kernel'], e['cpus'], e['mem_kib'] // 1024, a.size_mib, a.reps))
    conc = {}
    try:
        for provider in a.providers.split(','):
            b.per_provider(provider)
            conc[provider] = b.concurrent(provider)
    except BenchError as err:
        log('ERROR: %s' % err)
        return 2
    floor1 = b.spawn_floor()
    doc = b.report(conc, a.providers.split(','))
    doc['env']['true_spawn_ms'] = {'start': round(floor0, 2), 'end': round(floor1, 2)}
    doc['env']['python_hwm'] = b.python_hwm()
    log('os-brick side, not counted above: this Python process (os-brick imported) peaked at %s KiB,'
        ' its privsep daemon(s) at %s KiB' % (doc['env']['python_hwm']['runner_kib'],
                                             doc['env']['python_hwm']['privsep_daemons_kib']))
    log('process start floor (/bin/true): %.1f ms at the start, %.1f ms at the end' % (floor0, floor1))
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
