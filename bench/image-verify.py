#!/usr/bin/env python3
"""Image signature verification: luks-agent vs openssl vs cursive.

Times the verification of one signed image per size (default 1 GiB and
4 GiB of random data in a private work directory on disk) by three tools,
side by side in one run:

  ours     luks-agent image verify, certificate in the local key store
           (luks-agent keys import-certificate), no cloud
  openssl  openssl dgst -SHA -sigopt rsa_padding_mode:pss -verify pub.pem
           -signature sig.bin IMAGE
  cursive  cursive 0.3.1 in its venv (tests/harness/pyvenv.sh cursive):
           get_verifier with the certificate loaded from its PEM file (no
           key manager), update() with the image fed as each caller feeds
           it, verify() (tests/image_signatures/cursive_driver.py
           verify-file --feed):
             cursive-nova       glanceclient's 1 MiB chunks (nova's
                                download through the image API)
             cursive-cinder     1 KiB reads of the downloaded file
                                (cinder's _verify_image, before an image
                                is written into a volume)
             cursive-nova-file  the lines of the file (nova's direct
                                download of a file:// location iterates
                                the file object)

The page cache is warm for every tool alike: each image is read once
before its first measurement, and the work directory's size is checked
against available memory. Every command runs under GNU time, which
reports its peak RSS (`%M`); wall time is perf_counter around the spawn
and the reaping, process start included. Each measurement is repeated
(default 3) with the tools' order rotated, and the median is reported.

Targets: ours/openssl <= 1.0 and cursive/ours >= 5.0 for every feed; a
missed target is a MISS line and does not change the exit status. Exit status: 0 every
command behaved; 1 a tool failed to verify a good image or accepted a
bad signature (the tools disagree); 2 setup error.

Standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / 'tests' / 'image_signatures' / 'cursive_driver.py'
PYVENV = ROOT / 'tests' / 'harness' / 'pyvenv.sh'
CURSIVE_FEEDS = ('nova', 'cinder', 'nova-file')
TOOLS = ('ours', 'openssl') + tuple('cursive-' + f for f in CURSIVE_FEEDS)
OURS_VS_OPENSSL_MAX = 1.0
CURSIVE_VS_OURS_MIN = 5.0
GIB = 1024 ** 3


class SetupError(Exception):
    """The benchmark cannot run."""


def log(msg: str = '') -> None:
    """One line on stdout, flushed."""
    print(msg, flush=True)


def check(cmd: typing.Sequence[str], **kw: typing.Any) -> str:
    """Runs a setup command; returns stdout, SetupError on failure."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True,
                           timeout=600, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError('%s: %s' % (' '.join(map(str, cmd)), e))
    if r.returncode != 0:
        raise SetupError('%s: exit %d: %s' % (
            ' '.join(map(str, cmd)), r.returncode, r.stderr.strip()[-600:]))
    return r.stdout


class Result(typing.NamedTuple):
    """One command: exit status, seconds, peak RSS in KiB, stderr tail."""
    rc: int
    seconds: float
    rss_kib: typing.Optional[int]
    stderr: str


class Bench:
    """The work directory, the tools' commands and the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix='image-verify-',
                                         dir=args.tmpdir))
        os.chmod(self.tmp, 0o700)
        self.failures: typing.List[str] = []
        self.results: typing.List[dict] = []
        self.info: typing.Dict[str, typing.Any] = {}

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Tools, binary, venv, key, certificate, images and signatures."""
        a = self.args
        if not os.access(a.time_bin, os.X_OK) and not a.no_install \
                and os.geteuid() == 0 and shutil.which('apt-get'):
            log('GNU time missing: apt-get install -y time')
            subprocess.run(['apt-get', 'install', '-y', '-q', 'time'],
                           capture_output=True)
        if not (os.path.isfile(a.time_bin) and os.access(a.time_bin, os.X_OK)):
            raise SetupError('GNU time not found at %s (apt-get install '
                             'time)' % a.time_bin)
        if not shutil.which('openssl'):
            raise SetupError('openssl not found')
        self.info['openssl'] = check(['openssl', 'version']).strip()
        check(['sh', str(PYVENV), 'cursive', 'check'])
        venv = check(['sh', str(PYVENV), 'cursive', 'path']).strip()
        self.python = Path(venv) / 'bin' / 'python'
        self.info['cursive'] = check(
            [str(self.python), '-c', 'import importlib.metadata as m, '
             'cryptography; print("cursive", m.version("cursive"), '
             '"cryptography", cryptography.__version__)']).strip()

        if a.bin:
            src = Path(a.bin)
        else:
            src = ROOT / 'target' / 'release' / 'luks-agent'
            if not a.no_build:
                log('cargo build --release --locked (a no-op when up to '
                    'date)')
                r = subprocess.run(['cargo', 'build', '--release',
                                    '--locked'], cwd=ROOT,
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SetupError('cargo build --release failed:\n'
                                     + r.stderr[-2000:])
        if not (src.is_file() and os.access(src, os.X_OK)):
            raise SetupError('luks-agent binary %s missing' % src)
        st = src.stat()
        self.info['ours'] = {
            'path': str(src), 'size': st.st_size,
            'mtime': datetime.datetime.fromtimestamp(st.st_mtime)
            .isoformat(timespec='seconds')}
        # A private copy: a rebuild during the run changes nothing here.
        self.bin = self.tmp / 'luks-agent'
        shutil.copy2(src, self.bin)
        r = subprocess.run([str(self.bin), 'image', 'verify', '--help'],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError('%s has no `image verify`: %s' % (
                src, r.stderr.strip()[-300:]))

        need = sum(a.sizes_gib) * GIB
        free = shutil.disk_usage(self.tmp).free
        if free < need + GIB:
            raise SetupError('%s has %.1f GiB free, %.1f GiB needed' % (
                self.tmp, free / GIB, (need + GIB) / GIB))
        avail = self.mem_available()
        if avail is not None and avail < need + 2 * GIB:
            raise SetupError('%.1f GiB of memory available: the page cache '
                             'cannot hold %.1f GiB of images for all tools '
                             'alike' % (avail / GIB, need / GIB))

        # Key and certificate as the documented procedure makes them.
        self.key = self.tmp / 'private_key.pem'
        self.cert = self.tmp / 'new_cert.pem'
        self.pub = self.tmp / 'pub.pem'
        check(['openssl', 'genrsa', '-out', str(self.key), str(a.key_bits)])
        check(['openssl', 'req', '-new', '-x509', '-key', str(self.key),
               '-out', str(self.cert), '-days', '30', '-subj',
               '/CN=image-verify-bench'])
        check(['openssl', 'x509', '-in', str(self.cert), '-pubkey',
               '-noout', '-out', str(self.pub)])

        # Our local key store.
        keys = self.tmp / 'keys'
        keys.mkdir(mode=0o700)
        for d in ('state', 'run'):
            (self.tmp / d).mkdir(mode=0o700)
        self.config = self.tmp / 'agent.toml'
        self.config.write_text(
            'state_dir = %s\nrun_dir = %s\n\n[key_manager]\n'
            'backend = "local"\n\n[key_manager.local]\ndir = %s\n' % (
                json.dumps(str(self.tmp / 'state')),
                json.dumps(str(self.tmp / 'run')), json.dumps(str(keys))))
        os.chmod(self.config, 0o600)
        out = check([str(self.bin), '--config', str(self.config), 'keys',
                     'import-certificate', str(self.cert)]).strip()
        try:
            self.cert_id = str(uuid.UUID(out.split()[-1]))
        except (ValueError, IndexError):
            raise SetupError('keys import-certificate printed %r, not a '
                             'UUID' % out)

        # Images, each signed with openssl dgst as the documented
        # procedure signs it.
        self.images = []
        for gib in a.sizes_gib:
            img = self.tmp / ('image-%dG.raw' % gib)
            t0 = time.monotonic()
            self.random_file(img, gib * GIB)
            sig = self.tmp / ('image-%dG.sig' % gib)
            check(['openssl', 'dgst', '-' + self.dgst_name(), '-sign',
                   str(self.key), '-sigopt', 'rsa_padding_mode:pss',
                   '-out', str(sig), str(img)])
            bad = self.tmp / ('image-%dG.badsig' % gib)
            b = bytearray(sig.read_bytes())
            b[len(b) // 2] ^= 0x01
            bad.write_bytes(bytes(b))
            self.images.append({'gib': gib, 'path': img, 'sig': sig,
                                'bad_sig': bad})
            log('image %d GiB: written and signed in %.1f s' % (
                gib, time.monotonic() - t0))

    @staticmethod
    def mem_available() -> typing.Optional[int]:
        """MemAvailable in bytes, or None."""
        try:
            with open('/proc/meminfo') as f:
                for line in f:
                    if line.startswith('MemAvailable:'):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    @staticmethod
    def random_file(path: Path, size: int) -> None:
        """`size` bytes of random data (AES-CTR keystream from openssl
        under a random key: incompressible, and quicker than
        /dev/urandom)."""
        key = os.urandom(16).hex()
        iv = os.urandom(16).hex()
        with open(path, 'wb') as out:
            enc = subprocess.Popen(
                ['openssl', 'enc', '-aes-128-ctr', '-K', key, '-iv', iv,
                 '-in', '/dev/zero'], stdout=subprocess.PIPE)
            assert enc.stdout is not None
            left = size
            while left:
                chunk = enc.stdout.read(min(left, 8 << 20))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
            enc.kill()
            enc.wait()
        if path.stat().st_size != size:
            raise SetupError('could not write %s' % path)

    def dgst_name(self) -> str:
        """openssl dgst's name of the hash: sha256 for SHA-256."""
        return self.args.hash.replace('-', '').lower()

    @staticmethod
    def background_busy(seconds: float = 0.3) -> typing.Optional[float]:
        """Share of CPU time used by other processes while this one
        sleeps for `seconds` (from /proc/stat), or None."""
        def sample() -> typing.Tuple[int, int]:
            with open('/proc/stat') as f:
                v = [int(x) for x in f.readline().split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            return sum(v), idle
        try:
            t0, i0 = sample()
            time.sleep(seconds)
            t1, i1 = sample()
        except (OSError, ValueError, IndexError):
            return None
        return 1 - (i1 - i0) / (t1 - t0) if t1 > t0 else None

    def warm(self, path: Path) -> float:
        """Reads a file once so that it is in the page cache; seconds."""
        t0 = time.perf_counter()
        with open(path, 'rb', buffering=0) as f:
            while f.read(8 << 20):
                pass
        return time.perf_counter() - t0

    # ------------------------------------------------------------ tools
    def properties(self, image: dict, bad: bool) -> Path:
        """The image's glance properties as a JSON file."""
        import base64
        sig = image['bad_sig' if bad else 'sig'].read_bytes()
        p = self.tmp / ('props-%dG%s.json' % (image['gib'],
                                              '-bad' if bad else ''))
        p.write_text(json.dumps({
            'img_signature': base64.b64encode(sig).decode(),
            'img_signature_hash_method': self.args.hash,
            'img_signature_key_type': 'RSA-PSS',
            'img_signature_certificate_uuid': self.cert_id}))
        return p

    def command(self, tool: str, image: dict, bad: bool = False
                ) -> typing.List[str]:
        """The command line of one tool verifying one image."""
        props = self.properties(image, bad)
        if tool == 'ours':
            return [str(self.bin), '--config', str(self.config), 'image',
                    'verify', '--image-id', str(uuid.uuid4()), '--file',
                    str(image['path']), '--properties-file', str(props)]
        if tool == 'openssl':
            return ['openssl', 'dgst', '-' + self.dgst_name(), '-sigopt',
                    'rsa_padding_mode:pss', '-verify', str(self.pub),
                    '-signature', str(image['bad_sig' if bad else 'sig']),
                    str(image['path'])]
        return [str(self.python), str(DRIVER), 'verify-file', '--cert',
                str(self.cert), '--file', str(image['path']),
                '--properties', str(props), '--feed',
                tool[len('cursive-'):]]

    def timed(self, cmd: typing.List[str]) -> Result:
        """One run under GNU time: wall seconds and peak RSS."""
        rss_file = self.tmp / 'rss.txt'
        full = [self.args.time_bin, '-o', str(rss_file), '-f', '%M'] + cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        _, err = p.communicate()
        dt = time.perf_counter() - t0
        rss = None
        try:
            last = rss_file.read_text().strip().splitlines()[-1]
            rss = int(last)
        except (OSError, ValueError, IndexError):
            pass
        return Result(p.returncode, dt, rss,
                      err.decode(errors='replace')[-600:])

    # ------------------------------------------------------------ run
    def agreement(self, image: dict) -> None:
        """Untimed: every tool must reject a signature with one bit
        flipped."""
        for tool in TOOLS:
            r = self.timed(self.command(tool, image, bad=True))
            if r.rc == 0:
                self.failures.append('%s ACCEPTED a bad signature on the %d '
                                     'GiB image' % (tool, image['gib']))
                log('  check: %s accepted a bad signature: FAILURE' % tool)
            else:
                log('  check: %-17s rejects a bad signature (exit %d)'
                    % (tool, r.rc))

    def measure(self, image: dict) -> None:
        """`reps` rounds of all the tools, order rotated each round."""
        gib = image['gib']
        log('')
        log('[%d GiB] RSA-PSS %d, %s, random data, page cache warm (read '
            'once in %.2f s before the runs)' % (
                gib, self.args.key_bits, self.args.hash,
                self.warm(image['path'])))
        busy = self.background_busy()
        if busy is not None:
            log('  bg busy: %.0f %% of the CPUs used by other processes just '
                'before%s' % (busy * 100, '  WARNING: noisy machine, the '
                              'ratios are less reliable' if busy > 0.10
                              else ''))
        samples: typing.Dict[str, typing.List[Result]] = {t: [] for t in
                                                          TOOLS}
        dead: typing.Set[str] = set()
        for rep in range(self.args.reps):
            k = rep % len(TOOLS)
            order = TOOLS[k:] + TOOLS[:k]
            for tool in order:
                if tool in dead:
                    continue
                r = self.timed(self.command(tool, image))
                if r.rc != 0:
                    dead.add(tool)
                    self.failures.append(
                        '%s failed to verify the good %d GiB image (exit '
                        '%d): %s' % (tool, gib, r.rc, r.stderr.strip()))
                    log('  %s: exit %d: FAILURE\n    %s' % (
                        tool, r.rc, r.stderr.strip().replace('\n',
                                                              '\n    ')))
                    continue
                samples[tool].append(r)
        row: typing.Dict[str, typing.Any] = {'gib': gib, 'tools': {},
                                             'background_cpu_busy': busy}
        for tool in TOOLS:
            s = samples[tool]
            if tool in dead or not s:
                row['tools'][tool] = None
                continue
            secs = [x.seconds for x in s]
            med = statistics.median(secs)
            rss = max((x.rss_kib or 0) for x in s) or None
            row['tools'][tool] = {
                'median_s': med, 'min_s': min(secs), 'samples_s': secs,
                'peak_rss_kib': rss, 'mib_per_s': gib * 1024 / med}
            log('  %-17s median %8.3f s  min %8.3f s  %7.0f MiB/s  peak RSS '
                '%8s KiB' % (tool, med, min(secs), gib * 1024 / med,
                             rss if rss is not None else 'n/a'))
        t = row['tools']
        row['ours_vs_openssl'] = (t['ours']['median_s'] /
                                  t['openssl']['median_s']
                                  if t['ours'] and t['openssl'] else None)
        row['cursive_vs_ours'] = {
            f: (t['cursive-' + f]['median_s'] / t['ours']['median_s']
                if t['ours'] and t['cursive-' + f] else None)
            for f in CURSIVE_FEEDS}
        if row['ours_vs_openssl'] is not None:
            ok = row['ours_vs_openssl'] <= OURS_VS_OPENSSL_MAX
            log('  time ratio ours/openssl   = %6.3f (target <= %.1f) %s' % (
                row['ours_vs_openssl'], OURS_VS_OPENSSL_MAX,
                'PASS' if ok else 'MISS'))
        for feed, r in row['cursive_vs_ours'].items():
            if r is None:
                continue
            log('  time ratio %-17s/ours = %6.3f (target >= %.1f) %s' % (
                'cursive-' + feed, r, CURSIVE_VS_OURS_MIN,
                'PASS' if r >= CURSIVE_VS_OURS_MIN else 'MISS'))
        self.results.append(row)

    def summary(self) -> None:
        """The table, MISS lines, failures and the BENCH_JSON line."""
        log('')
        log('SUMMARY (medians of %d runs; wall time incl. process start; '
            'page cache warm)' % self.args.reps)
        cols = ['ours', 'openssl'] + ['cursive-' + f for f in CURSIVE_FEEDS]
        hdr = '%-6s' % 'size' + ''.join(' %19s' % (c + ' s') for c in cols) \
            + ' %13s' % 'ours/openssl' + ''.join(
                ' %22s' % ('cursive-%s/ours' % f) for f in CURSIVE_FEEDS)
        log(hdr)
        log('-' * len(hdr))
        misses = []

        def f(v: typing.Optional[float], spec: str) -> str:
            return format(v, spec) if v is not None else 'n/a'
        for row in self.results:
            t = row['tools']
            med = {k: (v['median_s'] if v else None) for k, v in t.items()}
            log('%-6s' % ('%d GiB' % row['gib'])
                + ''.join(' %19s' % f(med[c], '.3f') for c in cols)
                + ' %13s' % f(row['ours_vs_openssl'], '.3f')
                + ''.join(' %22s' % f(row['cursive_vs_ours'][x], '.3f')
                          for x in CURSIVE_FEEDS))
            r = row['ours_vs_openssl']
            if r is not None and r > OURS_VS_OPENSSL_MAX:
                misses.append('MISS %d GiB: ours/openssl = %.3f > %.1f (ours '
                              '%.3f s, openssl %.3f s)' % (
                                  row['gib'], r, OURS_VS_OPENSSL_MAX,
                                  med['ours'], med['openssl']))
            for feed, r in row['cursive_vs_ours'].items():
                if r is not None and r < CURSIVE_VS_OURS_MIN:
                    misses.append(
                        'MISS %d GiB: cursive-%s/ours = %.3f < %.1f (cursive '
                        '%.3f s, ours %.3f s)' % (
                            row['gib'], feed, r, CURSIVE_VS_OURS_MIN,
                            med['cursive-' + feed], med['ours']))
        log('')
        log('peak RSS, KiB (largest of the runs)')
        log('%-6s' % 'size' + ''.join(' %19s' % c for c in cols))
        for row in self.results:
            t = row['tools']
            log('%-6s' % ('%d GiB' % row['gib']) + ''.join(
                ' %19s' % f(t[c]['peak_rss_kib'] if t[c] else None, 'd')
                for c in cols))
        log('')
        if misses:
            log('%d performance target(s) missed (does not affect exit '
                'status):' % len(misses))
            for m in misses:
                log('  ' + m)
        else:
            log('all performance targets met')
        if self.failures:
            log('%d failure(s):' % len(self.failures))
            for x in self.failures:
                log('  ' + x)
        else:
            log('no command failures')
        doc = {
            'schema': 1, 'reps': self.args.reps, 'hash': self.args.hash,
            'key': 'RSA-PSS %d' % self.args.key_bits,
            'page_cache': 'warm',
            'timing': 'perf_counter around spawn..reap under GNU time, '
                      'process start included',
            'host': {'kernel': platform.release(), 'cpus': os.cpu_count(),
                     **self.info},
            'results': self.results, 'misses': misses,
            'failures': self.failures, 'ok': not self.failures,
        }
        if self.args.json_out:
            with open(self.args.json_out, 'w') as fh:
                json.dump(doc, fh, indent=2)
        log('BENCH_JSON ' + json.dumps(doc, separators=(',', ':')))

    def cleanup(self) -> None:
        """Removes the work directory unless --keep."""
        if self.args.keep:
            log('kept %s' % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description='image signature verification: luks-agent vs openssl '
                    'vs cursive (see bench/README.md)')
    ap.add_argument('--reps', type=int, default=3,
                    help='runs per tool and size; the median is reported '
                         '(default 3)')
    ap.add_argument('--sizes', default='1,4',
                    help='image sizes in GiB, comma separated (default 1,4)')
    ap.add_argument('--hash', default='SHA-256',
                    choices=('SHA-224', 'SHA-256', 'SHA-384', 'SHA-512'))
    ap.add_argument('--key-bits', type=int, default=2048,
                    help='RSA key size (default 2048)')
    ap.add_argument('--bin', help='measure this luks-agent binary; skips '
                                  'the build')
    ap.add_argument('--no-build', action='store_true',
                    help='use target/release/luks-agent as it is')
    ap.add_argument('--tmpdir', default=None,
                    help='parent of the work directory, on disk (default '
                         '$TMPDIR or /tmp)')
    ap.add_argument('--time-bin', default='/usr/bin/time',
                    help='GNU time (default /usr/bin/time)')
    ap.add_argument('--no-install', action='store_true',
                    help='never run apt-get install -y time')
    ap.add_argument('--json-out', help='also write the BENCH_JSON document '
                                       'here, pretty-printed')
    ap.add_argument('--keep', action='store_true',
                    help='keep the work directory')
    args = ap.parse_args()
    try:
        args.sizes_gib = [int(x) for x in args.sizes.split(',') if x.strip()]
    except ValueError:
        ap.error('--sizes takes a comma list of whole GiB')
    if not args.sizes_gib or min(args.sizes_gib) < 1 or args.reps < 1:
        ap.error('--sizes needs sizes >= 1 GiB and --reps >= 1')

    b = Bench(args)
    log('image signature verification: luks-agent vs openssl vs cursive - '
        + datetime.datetime.now().isoformat(timespec='seconds'))
    try:
        b.setup()
        log('host: Linux %s, %d CPUs; %s; %s' % (
            platform.release(), os.cpu_count() or 0, b.info['openssl'],
            b.info['cursive']))
        o = b.info['ours']
        log('luks-agent: %s (%d bytes, built %s), measured from a private '
            'copy' % (o['path'], o['size'], o['mtime']))
        log('work dir: %s; certificate %s in the local key store' % (
            b.tmp, b.cert_id))
        log('timing: perf_counter around spawn + reap of `%s -f %%M CMD`; '
            'peak RSS = its %%M (ru_maxrss of CMD); %d runs, order rotated, '
            'median' % (args.time_bin, args.reps))
        for image in b.images:
            b.measure(image)
            if image is b.images[0]:
                b.agreement(image)
        b.summary()
    except SetupError as e:
        log('SETUP ERROR: %s' % e)
        return 2
    except KeyboardInterrupt:
        log('interrupted')
        return 2
    finally:
        b.cleanup()
    return 1 if b.failures else 0


if __name__ == '__main__':
    sys.exit(main())
