#!/usr/bin/env python3
"""Image signature verification: luks-agent against cursive 0.3.1.

For every case, the image is signed as the documented procedure does it
(openssl genrsa / ecparam / dsaparam, a self-signed certificate from
`openssl req -new -x509`, `openssl dgst -SHA -sign key.pem [-sigopt
rsa_padding_mode:pss] -out sig image`, base64 of the signature as
`img_signature`), the certificates are stored in the real Barbican of
tests/harness/openstack.py (secret type `certificate`, payload the PEM, as
`openstack secret store --secret-type certificate` stores it), and then:

* cursive 0.3.1, in its own venv (tests/harness/pyvenv.sh cursive), gives
  its verdict as nova reaches it: castellan's Barbican key manager with the
  user's token, `get_verifier`, `verify_certificate` when trusted
  certificate ids are given, the image in glanceclient's 1 MiB chunks,
  `verify()` (tests/image_signatures/cursive_driver.py);
* `luks-agent image verify` gives its exit code, with the same Barbican,
  the same token and the same properties.

A case passes when both verdicts are equal (verified, not signed or
rejected), cursive's verdict is the one the case expects, and our exit code
is the expected class (0 verified, 13 not signed, 14 signature mismatch,
15 bad properties, 16 certificate problem, 6/7 key manager, 4 file). Any
mismatch, and anything that cannot run (no binary, no venv, Barbican not
up), exits non-zero: nothing is skipped.

  python3 tests/image_signatures/compat.py [--bin target/debug/luks-agent]
      [--state target/test-cloud] [--only REGEX] [--keep]
      [--expect CASE=CODE]...

Exit status: 0 every case passed; 1 a case failed; 2 the test could not run.
Standard library only; cursive runs in its venv's interpreter.
"""

import argparse
import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HARNESS = ROOT / 'tests' / 'harness'
sys.path.insert(0, str(HARNESS))
import openstack  # noqa: E402  (tests/harness/openstack.py, stdlib only)

DRIVER = HERE / 'cursive_driver.py'
PYVENV = HARNESS / 'pyvenv.sh'
DEFAULT_STATE = ROOT / 'target' / 'test-cloud'
HASHES = ('SHA-224', 'SHA-256', 'SHA-384', 'SHA-512')
# Exit codes of `luks-agent image verify`.
VERIFIED, NOT_SIGNED, MISMATCH, BAD_PROPERTIES, BAD_CERT = 0, 13, 14, 15, 16
KM_NOT_FOUND, KM_FORBIDDEN, KM_NONSENSE, FILE_UNREADABLE = 6, 7, 9, 4
OUR_TIMEOUT = 120
# An image that ends inside a chunk of every feed: 3 MiB + 4097 bytes.
IMAGE_SIZE = 3 * 1024 * 1024 + 4097

# A private openssl configuration: nothing from /etc/ssl/openssl.cnf leaks
# into the CA hierarchy's extensions (the plain self-signed certificates of
# the documented procedure do use the system configuration).
OPENSSL_CNF = """\
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = placeholder

[ ca ]
default_ca = ca_default
[ ca_default ]
dir = {ca_dir}
database = $dir/index.txt
new_certs_dir = $dir/new
serial = $dir/serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = none
email_in_dn = no
[ policy_any ]
commonName = supplied

[ root_ca ]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ root_ca_pathlen0 ]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ root_ca_no_key_usage ]
basicConstraints = critical, CA:true
subjectKeyIdentifier = hash
[ inter_ca ]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ inter_not_ca ]
basicConstraints = critical, CA:false
keyUsage = critical, keyCertSign, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ inter_no_basic_constraints ]
keyUsage = critical, keyCertSign, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ inter_no_key_sign ]
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ leaf ]
basicConstraints = CA:false
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ leaf_key_encipherment ]
basicConstraints = CA:false
keyUsage = critical, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class SetupError(Exception):
    """The test cannot run: a tool, the venv, the binary or Barbican."""


def log(msg: str = '') -> None:
    """One line on stdout, flushed."""
    print(msg, flush=True)


def run(cmd: typing.Sequence[str], timeout: float = 120,
        **kw: typing.Any) -> subprocess.CompletedProcess:
    """Runs a setup command; any failure is a SetupError."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, timeout=timeout,
                           **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError('%s: %s' % (' '.join(cmd), e))
    if r.returncode != 0:
        raise SetupError('%s: exit %d: %s' % (
            ' '.join(cmd), r.returncode,
            r.stderr.decode(errors='replace').strip()[-800:]))
    return r


@dataclasses.dataclass
class Key:
    """A private key made with the openssl CLI."""
    name: str
    kind: str          # rsa, ec, dsa
    path: Path


@dataclasses.dataclass
class Cert:
    """A certificate file and, once stored, its Barbican UUID."""
    name: str
    key: Key
    path: Path
    uuid: str = ''


class Material:
    """Keys, certificates and signatures, made with the openssl CLI."""

    def __init__(self, work: Path):
        self.work = work
        self.dir = work / 'pki'
        self.dir.mkdir()
        ca_dir = self.dir / 'ca'
        (ca_dir / 'new').mkdir(parents=True)
        (ca_dir / 'index.txt').write_text('')
        (ca_dir / 'serial').write_text('1000\n')
        self.cnf = self.dir / 'openssl.cnf'
        self.cnf.write_text(OPENSSL_CNF.format(ca_dir=ca_dir))
        self.dsaparams: typing.Dict[str, Path] = {}

    def key(self, name: str, kind: str, size: typing.Union[int, str],
            primes: int = 2) -> Key:
        """`openssl genrsa [-primes N] BITS`, `ecparam -name CURVE -genkey`,
        or `dsaparam BITS` + `gendsa`."""
        p = self.dir / (name + '.key')
        if kind == 'rsa':
            run(['openssl', 'genrsa', '-primes', str(primes), '-out', str(p),
                 str(size)])
        elif kind == 'ec':
            run(['openssl', 'ecparam', '-name', str(size), '-genkey',
                 '-noout', '-out', str(p)])
        elif kind == 'dsa':
            params = self.dsaparams.get(str(size))
            if params is None:
                params = self.dir / ('dsaparam%s.pem' % size)
                run(['openssl', 'dsaparam', '-out', str(params), str(size)])
                self.dsaparams[str(size)] = params
            run(['openssl', 'gendsa', '-out', str(p), str(params)])
        else:
            raise ValueError(kind)
        return Key(name, kind, p)

    def self_signed(self, name: str, key: Key, days: int = 365,
                    extensions: typing.Optional[str] = None) -> Cert:
        """`openssl req -new -x509`: with the system configuration (the
        documented procedure) unless an extension section of ours is
        named."""
        p = self.dir / (name + '.pem')
        cmd = ['openssl', 'req', '-new', '-x509', '-key', str(key.path),
               '-out', str(p), '-days', str(days), '-subj', '/CN=' + name]
        if extensions:
            cmd += ['-config', str(self.cnf), '-extensions', extensions]
        run(cmd)
        return Cert(name, key, p)

    def self_signed_dated(self, name: str, key: Key, start: str, end: str,
                          extensions: str) -> Cert:
        """A self-signed certificate with given dates (`openssl ca
        -selfsign`)."""
        csr = self.dir / (name + '.csr')
        run(['openssl', 'req', '-new', '-config', str(self.cnf), '-key',
             str(key.path), '-subj', '/CN=' + name, '-out', str(csr)])
        p = self.dir / (name + '.pem')
        run(['openssl', 'ca', '-batch', '-notext', '-config', str(self.cnf),
             '-selfsign', '-keyfile', str(key.path), '-in', str(csr),
             '-out', str(p), '-startdate', start, '-enddate', end,
             '-extfile', str(self.cnf), '-extensions', extensions])
        return Cert(name, key, p)

    def issue(self, name: str, key: Key, issuer: Cert, extensions: str,
              days: int = 365, start: typing.Optional[str] = None,
              end: typing.Optional[str] = None,
              sigopts: typing.Sequence[str] = ()) -> Cert:
        """A certificate for `key` signed by `issuer`: `openssl x509 -req`,
        or `openssl ca` when the dates are given."""
        csr = self.dir / (name + '.csr')
        run(['openssl', 'req', '-new', '-config', str(self.cnf), '-key',
             str(key.path), '-subj', '/CN=' + name, '-out', str(csr)])
        p = self.dir / (name + '.pem')
        if start is not None and end is not None:
            run(['openssl', 'ca', '-batch', '-notext', '-config',
                 str(self.cnf), '-cert', str(issuer.path), '-keyfile',
                 str(issuer.key.path), '-in', str(csr), '-out', str(p),
                 '-startdate', start, '-enddate', end, '-extfile',
                 str(self.cnf), '-extensions', extensions])
        else:
            run(['openssl', 'x509', '-req', '-in', str(csr), '-CA',
                 str(issuer.path), '-CAkey', str(issuer.key.path),
                 '-CAcreateserial', '-days', str(days), '-out', str(p),
                 '-extfile', str(self.cnf), '-extensions', extensions]
                + [a for o in sigopts for a in ('-sigopt', o)])
        return Cert(name, key, p)

    def sign(self, key: Key, hash_method: str, image: Path,
             pss_saltlen: typing.Optional[str] = None,
             rsa_padding: str = 'pss',
             mgf1: typing.Optional[str] = None) -> bytes:
        """`openssl dgst -sha256 -sign key.pem [-sigopt
        rsa_padding_mode:pss] -out sig image`; returns the signature."""
        sig = self.dir / ('sig-%s' % uuid.uuid4().hex[:12])
        cmd = ['openssl', 'dgst', '-' + hash_method.replace('-', '').lower(),
               '-sign', str(key.path)]
        if key.kind == 'rsa' and rsa_padding == 'pss':
            cmd += ['-sigopt', 'rsa_padding_mode:pss']
            if pss_saltlen:
                cmd += ['-sigopt', 'rsa_pss_saltlen:' + pss_saltlen]
            if mgf1:
                cmd += ['-sigopt', 'rsa_mgf1_md:' + mgf1]
        cmd += ['-out', str(sig), str(image)]
        run(cmd)
        return sig.read_bytes()


def der_to_raw(sig: bytes) -> bytes:
    """An (EC)DSA signature, DER SEQUENCE {r, s}, as fixed-width r || s."""
    def item(b: bytes, i: int) -> typing.Tuple[int, bytes, int]:
        tag, n = b[i], b[i + 1]
        i += 2
        if n & 0x80:
            k = n & 0x7f
            n = int.from_bytes(b[i:i + k], 'big')
            i += k
        return tag, b[i:i + n], i + n
    tag, body, _ = item(sig, 0)
    assert tag == 0x30, 'not a DER SEQUENCE'
    _, r, i = item(body, 0)
    _, s, _ = item(body, i)
    r, s = r.lstrip(b'\0'), s.lstrip(b'\0')
    width = max(len(r), len(s))
    return r.rjust(width, b'\0') + s.rjust(width, b'\0')


def b64(sig: bytes) -> str:
    """The signature as `base64 -w 0 sig` writes it."""
    return base64.b64encode(sig).decode()


def props(sig: typing.Union[bytes, str], hash_method: str, key_type: str,
          cert: typing.Union[Cert, str]) -> dict:
    """The four glance image properties of a signed image."""
    return {
        'img_signature': sig if isinstance(sig, str) else b64(sig),
        'img_signature_hash_method': hash_method,
        'img_signature_key_type': key_type,
        'img_signature_certificate_uuid':
            cert if isinstance(cert, str) else cert.uuid,
    }


@dataclasses.dataclass
class Case:
    """One image, its properties and what both verifiers must say."""
    name: str
    file: Path
    properties: dict
    cursive: str                          # verified, not_signed, rejected
    ours: typing.Tuple[int, ...]          # accepted exit codes
    trusted: typing.Optional[typing.List[str]] = None
    user: str = 'alice'
    inline: bool = False                  # --properties instead of a file
    why: str = ''
    # A verdict that differs from cursive's on purpose (what the issue
    # asks for beyond cursive); `ours` still says which exit is right.
    differs_by_design: str = ''


def verdict_of_exit(code: int) -> str:
    """Our exit code as a verdict."""
    if code == VERIFIED:
        return 'verified'
    if code == NOT_SIGNED:
        return 'not_signed'
    return 'rejected'


class Compat:
    """Builds the material, runs both verifiers and compares."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix='image-signatures-'))
        os.chmod(self.work, 0o700)
        self.cases: typing.List[Case] = []

    # ------------------------------------------------------------ setup
    def preflight(self) -> None:
        """The binary, the venv, openssl and the cloud, or SetupError."""
        for tool in ('openssl',):
            if not shutil.which(tool):
                raise SetupError('%s not found' % tool)
        self.bin = None
        if self.args.cursive_only:
            b = None
        else:
            b = Path(self.args.bin)
        if b is None:
            pass
        elif not (b.is_file() and os.access(b, os.X_OK)):
            raise SetupError('luks-agent binary %s missing or not '
                             'executable (build it: cargo build)' % b)
        if b is not None:
            r = subprocess.run([str(b), 'image', 'verify', '--help'],
                               capture_output=True, timeout=30)
            if r.returncode != 0:
                raise SetupError('%s image verify --help: exit %d: %s' % (
                    b, r.returncode,
                    r.stderr.decode(errors='replace')[-300:]))
            self.bin = b.resolve()
        venv = subprocess.run(['sh', str(PYVENV), 'cursive', 'path'],
                              capture_output=True, text=True)
        run(['sh', str(PYVENV), 'cursive', 'check'])
        self.python = Path(venv.stdout.strip()) / 'bin' / 'python'
        state = Path(self.args.state).absolute()
        run([sys.executable, str(HARNESS / 'openstack.py'), 'start',
             '--state', str(state)], timeout=300)
        run([sys.executable, str(HARNESS / 'openstack.py'), 'status',
             '--state', str(state)], timeout=60)
        self.cloud = openstack.load_cloud(state)
        try:
            self.tokens = {u: openstack.user_token(self.cloud, u)
                           for u in ('alice', 'bob')}
        except openstack.HarnessError as e:
            raise SetupError('Keystone: %s' % e)
        for u, t in self.tokens.items():
            p = self.work / (u + '.token')
            p.write_text(t)
            os.chmod(p, 0o600)
        self.config = self.work / 'agent.toml'
        (self.work / 'state').mkdir(mode=0o700)
        (self.work / 'run').mkdir(mode=0o700)
        self.config.write_text(
            'state_dir = %s\nrun_dir = %s\n\n[key_manager]\n'
            'backend = "barbican"\n\n[key_manager.barbican]\nendpoint = %s\n'
            % (json.dumps(str(self.work / 'state')),
               json.dumps(str(self.work / 'run')),
               json.dumps(self.cloud['barbican']['endpoint'])))
        os.chmod(self.config, 0o600)

    def store(self, payload: bytes, secret_type: str = 'certificate',
              name: str = 'image-signing-cert') -> str:
        """Stores a secret as alice; returns its UUID."""
        try:
            return openstack.store_secret(self.cloud, self.tokens['alice'],
                                          payload, secret_type, None, name)
        except openstack.HarnessError as e:
            raise SetupError('Barbican: %s' % e)

    def store_cert(self, cert: Cert) -> Cert:
        """The certificate's PEM file as a `certificate` secret."""
        cert.uuid = self.store(cert.path.read_bytes(), name=cert.name)
        return cert

    # ------------------------------------------------------------ cases
    def build(self) -> None:
        """Every key, certificate, signature and case."""
        m = Material(self.work)
        img = self.work / 'image.raw'
        with open(img, 'wb') as f:
            f.write(os.urandom(IMAGE_SIZE))
        t0 = time.monotonic()
        log('making keys and certificates with %s' % run(
            ['openssl', 'version']).stdout.decode().strip())
        add = self.cases.append

        # The signature matrix: every size and hash the properties allow.
        rsa: typing.Dict[int, Cert] = {}
        for bits in (2048, 3072, 4096):
            k = m.key('rsa%d' % bits, 'rsa', bits)
            rsa[bits] = self.store_cert(m.self_signed('rsa%d' % bits, k))
            for h in HASHES:
                add(Case('rsa%d-%s' % (bits, h.lower()), img,
                         props(m.sign(k, h, img), h, 'RSA-PSS', rsa[bits]),
                         'verified', (VERIFIED,),
                         inline=(bits == 3072 and h == 'SHA-256')))
        # Wider than the rsa crate's default limit of 8192 bits, within
        # OpenSSL's 16384. Five primes only make the key quick to generate;
        # its public half is an ordinary RSA key.
        k = m.key('rsa9216', 'rsa', 9216, primes=5)
        wide = self.store_cert(m.self_signed('rsa9216', k))
        wsig = m.sign(k, 'SHA-256', img)
        add(Case('rsa9216-sha256', img,
                 props(wsig, 'SHA-256', 'RSA-PSS', wide),
                 'verified', (VERIFIED,)))
        ecc: typing.Dict[str, Cert] = {}
        for curve, kt in (('secp384r1', 'ECC_SECP384R1'),
                          ('secp521r1', 'ECC_SECP521R1')):
            k = m.key(curve, 'ec', curve)
            ecc[curve] = self.store_cert(m.self_signed(curve, k))
            for h in HASHES:
                add(Case('%s-%s' % (kt.lower(), h.lower()), img,
                         props(m.sign(k, h, img), h, kt, ecc[curve]),
                         'verified', (VERIFIED,)))
        dk = m.key('dsa2048', 'dsa', 2048)
        dsa = self.store_cert(m.self_signed('dsa2048', dk))
        for h in ('SHA-224', 'SHA-256', 'SHA-512'):
            add(Case('dsa2048-%s' % h.lower(), img,
                     props(m.sign(dk, h, img), h, 'DSA', dsa),
                     'verified', (VERIFIED,),
                     why='q is 224 bits: longer digests are truncated'))
        # Sizes outside FIPS 186's four (p, q) pairs, which openssl makes
        # (q of 224 bits) and OpenSSL verifies with.
        for bits in (1536, 4096):
            k = m.key('dsa%d' % bits, 'dsa', bits)
            c = self.store_cert(m.self_signed('dsa%d' % bits, k))
            s = m.sign(k, 'SHA-256', img)
            add(Case('dsa%d-sha256' % bits, img,
                     props(s, 'SHA-256', 'DSA', c), 'verified', (VERIFIED,)))
            t = bytearray(s)
            t[-1] ^= 0x01
            add(Case('tampered-signature-dsa%d' % bits, img,
                     props(bytes(t), 'SHA-256', 'DSA', c), 'rejected',
                     (MISMATCH,)))

        # Signature encodings.
        sig = m.sign(rsa[2048].key, 'SHA-256', img)
        good = props(sig, 'SHA-256', 'RSA-PSS', rsa[2048])
        wrapped = '\n'.join(re.findall('.{1,76}', b64(sig)))
        add(Case('signature-base64-wrapped-76', img,
                 dict(good, img_signature=wrapped), 'verified', (VERIFIED,),
                 why='base64 of `base64 sig` (no -w 0): cursive decodes it'))
        for salt in ('digest', '0', '20', '100', 'max'):
            add(Case('rsa-pss-salt-%s' % salt, img,
                     props(m.sign(rsa[2048].key, 'SHA-256', img, salt),
                           'SHA-256', 'RSA-PSS', rsa[2048]),
                     'verified', (VERIFIED,),
                     why='cursive asks for PSS.MAX_LENGTH, which '
                         'cryptography verifies as "auto": any salt length'))
        add(Case('rsa-pss-mgf1-sha1', img,
                 props(m.sign(rsa[2048].key, 'SHA-256', img,
                              mgf1='sha1'), 'SHA-256', 'RSA-PSS', rsa[2048]),
                 'rejected', (MISMATCH,),
                 why='cursive uses MGF1 with the image hash'))
        add(Case('rsa-pkcs1v15-signature', img,
                 props(m.sign(rsa[2048].key, 'SHA-256', img,
                              rsa_padding='pkcs1'),
                       'SHA-256', 'RSA-PSS', rsa[2048]),
                 'rejected', (MISMATCH,)))
        add(Case('hash-method-differs-from-signature', img,
                 dict(good, img_signature_hash_method='SHA-512'),
                 'rejected', (MISMATCH,)))

        # Tampered image, tampered signature, another key's certificate.
        bad = self.work / 'image-tampered.raw'
        data = bytearray(img.read_bytes())
        data[IMAGE_SIZE // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        ek = ecc['secp384r1'].key
        esig = m.sign(ek, 'SHA-384', img)
        dsig = m.sign(dk, 'SHA-256', img)
        for tag, s, h, kt, c in (
                ('rsa', sig, 'SHA-256', 'RSA-PSS', rsa[2048]),
                ('rsa9216', wsig, 'SHA-256', 'RSA-PSS', wide),
                ('ecc', esig, 'SHA-384', 'ECC_SECP384R1', ecc['secp384r1']),
                ('dsa', dsig, 'SHA-256', 'DSA', dsa)):
            add(Case('tampered-image-%s' % tag, bad, props(s, h, kt, c),
                     'rejected', (MISMATCH,)))
            # The last byte: inside s for DER (EC)DSA, so the DER stays valid.
            t = bytearray(s)
            t[-1] ^= 0x01
            add(Case('tampered-signature-%s' % tag, img,
                     props(bytes(t), h, kt, c), 'rejected', (MISMATCH,)))
            add(Case('truncated-signature-%s' % tag, img,
                     props(s[:-1], h, kt, c), 'rejected', (MISMATCH,)))
            if kt != 'RSA-PSS':
                add(Case('raw-r-s-signature-%s' % tag, img,
                         props(der_to_raw(s), h, kt, c), 'rejected',
                         (MISMATCH,),
                         why='cursive takes only the DER SEQUENCE of r, s '
                             '(what openssl dgst -sign writes)'))
        other_rsa = self.store_cert(m.self_signed(
            'rsa2048-other', m.key('rsa2048-other', 'rsa', 2048)))
        other_ecc = self.store_cert(m.self_signed(
            'secp384r1-other', m.key('secp384r1-other', 'ec', 'secp384r1')))
        other_dsa = self.store_cert(m.self_signed(
            'dsa2048-other', m.key('dsa2048-other', 'dsa', 2048)))
        add(Case('wrong-certificate-rsa', img,
                 props(sig, 'SHA-256', 'RSA-PSS', other_rsa),
                 'rejected', (MISMATCH,)))
        add(Case('wrong-certificate-ecc', img,
                 props(esig, 'SHA-384', 'ECC_SECP384R1', other_ecc),
                 'rejected', (MISMATCH,)))
        add(Case('wrong-certificate-dsa', img,
                 props(dsig, 'SHA-256', 'DSA', other_dsa),
                 'rejected', (MISMATCH,),
                 why='same DSA domain parameters, another key'))

        # Key type against the certificate's public key.
        add(Case('key-type-ecc-with-rsa-certificate', img,
                 props(sig, 'SHA-256', 'ECC_SECP384R1', rsa[2048]),
                 'rejected', (BAD_CERT,)))
        add(Case('key-type-rsa-with-ecc-certificate', img,
                 props(esig, 'SHA-384', 'RSA-PSS', ecc['secp384r1']),
                 'rejected', (BAD_CERT,)))
        add(Case('key-type-dsa-with-rsa-certificate', img,
                 props(sig, 'SHA-256', 'DSA', rsa[2048]),
                 'rejected', (BAD_CERT,)))
        add(Case('key-type-rsa-with-dsa-certificate', img,
                 props(dsig, 'SHA-256', 'RSA-PSS', dsa),
                 'rejected', (BAD_CERT,)))
        add(Case('key-type-secp521r1-with-secp384r1-certificate', img,
                 props(esig, 'SHA-384', 'ECC_SECP521R1', ecc['secp384r1']),
                 'verified', (VERIFIED,),
                 why='cursive checks only that the key is an EC key, '
                     'not its curve'))

        # Properties.
        add(Case('hash-method-sha1', img,
                 dict(good, img_signature_hash_method='SHA-1'),
                 'rejected', (BAD_PROPERTIES,)))
        add(Case('hash-method-lower-case', img,
                 dict(good, img_signature_hash_method='sha256'),
                 'rejected', (BAD_PROPERTIES,)))
        add(Case('key-type-unknown', img,
                 dict(good, img_signature_key_type='RSA'),
                 'rejected', (BAD_PROPERTIES,)))
        add(Case('key-type-sect571k1', img,
                 dict(good, img_signature_key_type='ECC_SECT571K1'),
                 'rejected', (BAD_PROPERTIES,),
                 why='in nova\'s enum; gone from cryptography, so cursive '
                     'does not register it'))
        add(Case('signature-not-base64', img,
                 dict(good, img_signature='QUJDR'), 'rejected',
                 (BAD_PROPERTIES,), inline=True))
        add(Case('signature-empty', img, dict(good, img_signature=''),
                 'rejected', (BAD_PROPERTIES,)))
        for missing in ('img_signature_certificate_uuid', 'img_signature',
                        'img_signature_hash_method',
                        'img_signature_key_type'):
            p = dict(good)
            del p[missing]
            add(Case('partial-without-%s' % missing.replace('img_', ''),
                     img, p, 'rejected', (BAD_PROPERTIES,),
                     why='nova calls get_verifier with None: "Required image '
                         'properties ... do not exist"'))
        add(Case('partial-only-signature', img,
                 {'img_signature': good['img_signature'],
                  'os_distro': 'debian'}, 'rejected', (BAD_PROPERTIES,)))
        add(Case('no-properties', img, {}, 'not_signed', (NOT_SIGNED,),
                 inline=True))
        add(Case('unrelated-properties-only', img,
                 {'hw_disk_bus': 'virtio', 'os_distro': 'debian'},
                 'not_signed', (NOT_SIGNED,)))
        add(Case('extra-properties-ignored', img,
                 dict(good, hw_disk_bus='virtio', os_type='linux'),
                 'verified', (VERIFIED,)))

        # The key manager and what it holds.
        add(Case('certificate-not-in-barbican', img,
                 dict(good, img_signature_certificate_uuid=str(uuid.uuid4())),
                 'rejected', (KM_NOT_FOUND,)))
        add(Case('certificate-of-another-project', img, good, 'rejected',
                 (KM_FORBIDDEN,), user='bob',
                 why="bob's token on proj-a's secret: 403"))
        sym = self.store(os.urandom(32), 'symmetric', 'not-a-certificate')
        add(Case('secret-is-symmetric-key', img,
                 dict(good, img_signature_certificate_uuid=sym),
                 'rejected', (BAD_CERT,),
                 why='castellan SymmetricKey: "Invalid certificate format: '
                     'RAW"'))
        opaque = self.store(rsa[2048].path.read_bytes(), 'opaque',
                            'certificate-as-opaque')
        add(Case('certificate-stored-as-opaque-secret', img,
                 dict(good, img_signature_certificate_uuid=opaque),
                 'rejected', (BAD_CERT,),
                 why='castellan OpaqueData, format "Opaque"'))
        der = run(['openssl', 'x509', '-in', str(rsa[2048].path),
                   '-outform', 'DER']).stdout
        der_id = self.store(der, 'certificate', 'certificate-der')
        add(Case('certificate-secret-holding-der', img,
                 dict(good, img_signature_certificate_uuid=der_id),
                 'rejected', (BAD_CERT, KM_NONSENSE),
                 why='castellan reads a certificate secret as PEM only '
                     '(load_pem_x509_certificate raises ValueError)'))
        bundle_id = self.store(rsa[2048].path.read_bytes()
                               + other_rsa.path.read_bytes(),
                               'certificate', 'certificate-bundle')
        add(Case('certificate-secret-pem-bundle-first-used', img,
                 dict(good, img_signature_certificate_uuid=bundle_id),
                 'verified', (VERIFIED,),
                 why='the first CERTIFICATE block is the certificate'))
        add(Case('image-file-missing', self.work / 'no-such-image', good,
                 'rejected', (FILE_UNREADABLE,)))

        self.chain_cases(m, img, bad)
        log('material ready in %.1f s: %d cases' % (time.monotonic() - t0,
                                                    len(self.cases)))

    def chain_cases(self, m: Material, img: Path, bad: Path) -> None:
        """Certificate validation (`verify_certificate`) cases."""
        add = self.cases.append
        root = self.store_cert(m.self_signed(
            'root-ca', m.key('root-ca', 'rsa', 2048), 3650, 'root_ca'))
        other_root = self.store_cert(m.self_signed(
            'other-root-ca', m.key('other-root-ca', 'rsa', 2048), 3650,
            'root_ca'))

        def leaf(name: str, issuer: Cert, kind: str = 'rsa',
                 size: typing.Union[int, str] = 2048,
                 **kw: typing.Any) -> Cert:
            return self.store_cert(m.issue(name, m.key(name, kind, size),
                                           issuer, 'leaf', **kw))

        def signed(name: str, c: Cert, trusted: typing.List[Cert],
                   cursive: str, ours: typing.Tuple[int, ...],
                   why: str = '', h: str = 'SHA-256',
                   image: typing.Optional[Path] = None,
                   extra_trusted: typing.Sequence[str] = ()) -> None:
            kt = {'rsa': 'RSA-PSS', 'dsa': 'DSA'}.get(
                c.key.kind, 'ECC_SECP384R1')
            add(Case(name, image or img,
                     props(m.sign(c.key, h, img), h, kt, c), cursive, ours,
                     trusted=list(extra_trusted) + [t.uuid for t in trusted],
                     why=why))

        l1 = leaf('leaf-of-root', root)
        signed('chain-leaf-root-trusted-root', l1, [root], 'verified',
               (VERIFIED,))
        signed('chain-leaf-root-tampered-image', l1, [root], 'rejected',
               (MISMATCH,), image=bad)
        le = leaf('leaf-ecc-of-root', root, 'ec', 'secp384r1')
        signed('chain-ecc-leaf-root-trusted-root', le, [root], 'verified',
               (VERIFIED,), h='SHA-384')
        pss = self.store_cert(m.issue(
            'leaf-pss-signed', m.key('leaf-pss-signed', 'rsa', 2048), root,
            'leaf', sigopts=['rsa_padding_mode:pss']))
        signed('chain-leaf-certificate-signed-rsa-pss', pss, [root],
               'rejected', (VERIFIED,),
               why='cursive checks an RSA issuer\'s signature on a '
                   'certificate as PKCS#1 v1.5 only')
        self.cases[-1].differs_by_design = (
            'RSA-PSS certificate signatures are accepted here')
        ec_root = self.store_cert(m.self_signed(
            'root-ca-ecc', m.key('root-ca-ecc', 'ec', 'secp384r1'), 3650,
            'root_ca'))
        signed('chain-rsa-leaf-ecc-root', leaf('leaf-of-ecc-root', ec_root),
               [ec_root], 'verified', (VERIFIED,))
        signed('chain-trusted-includes-missing-id', l1, [root], 'verified',
               (VERIFIED,), extra_trusted=[str(uuid.uuid4())],
               why='cursive skips a trusted id it cannot fetch')
        signed('chain-trusted-only-missing-id', l1, [], 'rejected',
               (BAD_CERT,), extra_trusted=[str(uuid.uuid4())],
               why='no trusted certificate left: chain building fails')
        signed('chain-untrusted-ca', leaf('leaf-of-other-root', other_root),
               [root], 'rejected', (BAD_CERT,))
        signed('chain-expired-leaf', leaf(
            'leaf-expired', root, start='20200101000000Z',
            end='20210101000000Z'), [root], 'rejected', (BAD_CERT,))
        signed('chain-not-yet-valid-leaf', leaf(
            'leaf-future', root, start='20990101000000Z',
            end='21000101000000Z'), [root], 'rejected', (BAD_CERT,))
        expired = leaf('leaf-expired-no-trust', root,
                       start='20200101000000Z', end='20210101000000Z')
        signed('expired-certificate-without-trusted-ids', expired, [],
               'verified', (VERIFIED,),
               why='without trusted ids nova checks only the signature')
        self.cases[-1].trusted = None
        old_root = self.store_cert(m.self_signed_dated(
            'root-ca-expired', m.key('root-ca-expired', 'rsa', 2048),
            '20200101000000Z', '20210101000000Z', 'root_ca'))
        signed('chain-expired-root', leaf('leaf-of-expired-root', old_root),
               [old_root], 'rejected', (BAD_CERT,),
               why='an expired trusted certificate is not used')
        bare_root = self.store_cert(m.self_signed(
            'root-ca-no-key-usage', m.key('root-ca-no-ku', 'rsa', 2048),
            3650, 'root_ca_no_key_usage'))
        signed('chain-root-without-key-usage', leaf(
            'leaf-of-bare-root', bare_root), [bare_root], 'rejected',
            (BAD_CERT,), why='a signing certificate needs keyUsage '
                             'keyCertSign')

        # leaf <- intermediate <- root.
        def inter(name: str, issuer: Cert, ext: str) -> Cert:
            return self.store_cert(m.issue(name, m.key(name, 'rsa', 2048),
                                           issuer, ext))
        i1 = inter('intermediate-ca', root, 'inter_ca')
        l3 = leaf('leaf-of-intermediate', i1)
        signed('chain3-trusted-intermediate-and-root', l3, [i1, root],
               'verified', (VERIFIED,))
        signed('chain3-trusted-root-and-intermediate-order', l3, [root, i1],
               'verified', (VERIFIED,))
        signed('chain3-trusted-root-only', l3, [root], 'rejected',
               (BAD_CERT,),
               why='cursive builds the chain from trusted certificates '
                   'only: the intermediate must be trusted too')
        signed('chain3-trusted-intermediate-only', l3, [i1], 'rejected',
               (BAD_CERT,),
               why='the chain must end at a trusted self-signed root')
        for ext, why in (
                ('inter_not_ca', 'basicConstraints CA:false'),
                ('inter_no_basic_constraints', 'no basicConstraints'),
                ('inter_no_key_sign', 'keyUsage without keyCertSign')):
            i = inter('intermediate-' + ext, root, ext)
            signed('chain3-%s' % ext.replace('_', '-'),
                   leaf('leaf-of-' + ext, i), [i, root], 'rejected',
                   (BAD_CERT,), why=why)
        root0 = self.store_cert(m.self_signed(
            'root-ca-pathlen0', m.key('root-ca-pathlen0', 'rsa', 2048), 3650,
            'root_ca_pathlen0'))
        i0 = inter('intermediate-of-pathlen0', root0, 'inter_ca')
        signed('chain3-root-pathlen0', leaf('leaf-of-pathlen0', i0),
               [i0, root0], 'rejected', (BAD_CERT,),
               why='pathlen:0 allows no intermediate')
        signed('chain2-root-pathlen0', leaf('leaf-of-root-pathlen0', root0),
               [root0], 'verified', (VERIFIED,))

        # cursive never looks at the signing certificate's own key usage.
        ke = self.store_cert(m.issue(
            'leaf-key-encipherment', m.key('leaf-key-encipherment', 'rsa',
                                           2048), root,
            'leaf_key_encipherment'))
        signed('leaf-key-usage-without-digital-signature', ke, [],
               'verified', (VERIFIED,),
               why='keyUsage keyEncipherment, extendedKeyUsage serverAuth')
        self.cases[-1].trusted = None
        signed('chain-leaf-key-usage-without-digital-signature', ke, [root],
               'verified', (VERIFIED,),
               why='keyUsage keyEncipherment, extendedKeyUsage serverAuth')

        # Self-signed signing certificates as their own trust anchor.
        ca_self = self.store_cert(m.self_signed(
            'self-signed-ca', m.key('self-signed-ca', 'rsa', 2048), 365,
            'root_ca'))
        signed('self-signed-ca-trusted-itself', ca_self, [ca_self],
               'verified', (VERIFIED,))
        doc = self.store_cert(m.self_signed(
            'self-signed-documented', m.key('self-signed-doc', 'rsa', 2048)))
        signed('self-signed-documented-trusted-itself', doc, [doc],
               'rejected', (BAD_CERT,),
               why="openssl's default v3_ca has no keyUsage, so cursive will "
                   "not use it as a signing certificate")
        signed('self-signed-documented-other-trusted', doc, [root],
               'rejected', (BAD_CERT,))

    # ------------------------------------------------------------ running
    def run_cursive(self) -> typing.Dict[str, dict]:
        """All cases through cursive in one venv process."""
        users = {}
        for u in {c.user for c in self.cases}:
            users[u] = {'token': self.tokens[u],
                        'project_id': self.cloud['users'][u]['project_id']}
        job = {'auth_url': self.cloud['keystone']['auth_url'],
               'users': users, 'feed': 'nova',
               'cases': [{'name': c.name, 'file': str(c.file),
                          'properties': c.properties, 'trusted': c.trusted,
                          'user': c.user} for c in self.cases]}
        jf = self.work / 'cursive-job.json'
        jf.write_text(json.dumps(job))
        os.chmod(jf, 0o600)
        t0 = time.monotonic()
        try:
            r = subprocess.run([str(self.python), str(DRIVER), 'compat',
                                str(jf)], capture_output=True, text=True,
                               timeout=900)
        except subprocess.TimeoutExpired:
            raise SetupError('cursive driver timed out')
        out = {}
        for line in r.stdout.splitlines():
            if line.startswith('{'):
                d = json.loads(line)
                out[d['name']] = d
        (self.work / 'cursive-stderr.log').write_text(r.stderr)
        if r.returncode != 0 or len(out) != len(self.cases):
            raise SetupError('cursive driver: exit %d, %d of %d verdicts; '
                             'stderr tail:\n%s' % (
                                 r.returncode, len(out), len(self.cases),
                                 r.stderr[-2000:]))
        log('cursive 0.3.1: %d verdicts in %.1f s' % (
            len(out), time.monotonic() - t0))
        return out

    def run_ours(self, c: Case) -> typing.Tuple[int, str, str]:
        """`luks-agent image verify` on one case: (exit, stdout, stderr)."""
        cmd = [str(self.bin), '--config', str(self.config), 'image', 'verify',
               '--image-id', self.image_id(c), '--file', str(c.file)]
        if c.inline:
            cmd += ['--properties', json.dumps(c.properties)]
        else:
            pf = self.work / ('props-%s.json' % c.name)
            pf.write_text(json.dumps(c.properties))
            cmd += ['--properties-file', str(pf)]
        for t in c.trusted or ():
            cmd += ['--trusted-cert-id', t]
        cmd += ['--token-file', str(self.work / (c.user + '.token'))]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=OUR_TIMEOUT)
        except subprocess.TimeoutExpired:
            return -1, '', 'timed out after %d s' % OUR_TIMEOUT
        except OSError as e:
            raise SetupError('%s: %s' % (self.bin, e))
        return r.returncode, r.stdout, r.stderr

    @staticmethod
    def image_id(c: Case) -> str:
        """A stable image id per case name."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, 'image-signatures/' +
                              c.name))

    def check_stdout(self, c: Case, code: int, stdout: str) -> str:
        """On exit 0 or 13 the one JSON object; '' when it is right."""
        if code not in (VERIFIED, NOT_SIGNED):
            return ''
        try:
            doc = json.loads(stdout)
        except ValueError:
            return 'stdout is not one JSON object: %r' % stdout[:200]
        want = 'verified' if code == VERIFIED else 'not_signed'
        problems = []
        if not isinstance(doc, dict):
            return 'stdout is not a JSON object'
        if doc.get('result') != want:
            problems.append('result %r, want %r' % (doc.get('result'), want))
        if doc.get('image_id') != self.image_id(c):
            problems.append('image_id %r' % doc.get('image_id'))
        if code == VERIFIED and doc.get('bytes') != c.file.stat().st_size:
            problems.append('bytes %r, want %d' % (doc.get('bytes'),
                                                   c.file.stat().st_size))
        return '; '.join(problems)

    def compare(self, verdicts: typing.Dict[str, dict]) -> int:
        """Runs ours on every case and prints one line each; returns the
        number of failed cases."""
        failed = 0
        t0 = time.monotonic()
        width = max(len(c.name) for c in self.cases)
        for c in self.cases:
            cv = verdicts[c.name]
            problems = []
            if cv['verdict'] != c.cursive:
                problems.append('cursive said %s (%s: %s), the case expects '
                                '%s' % (cv['verdict'], cv['error'],
                                        cv['message'], c.cursive))
            if self.bin is None:
                failed += bool(problems)
                log('%-*s  cursive=%-10s  ours=-    %s' % (
                    width, c.name, cv['verdict'],
                    'ok' if not problems else 'MISMATCH'))
                if problems or self.args.verbose:
                    if cv['error']:
                        log('    cursive: %s at %s: %s' % (
                            cv['error'], cv['stage'], cv['message']))
                    for p in problems:
                        log('    ' + p)
                continue
            code, out, err = self.run_ours(c)
            if verdict_of_exit(code) != cv['verdict'] and \
                    not c.differs_by_design:
                problems.append('verdicts differ: cursive %s, ours %s'
                                % (cv['verdict'], verdict_of_exit(code)))
            if code not in c.ours:
                problems.append('our exit %d, expected %s' % (
                    code, ' or '.join(map(str, c.ours))))
            bad_out = self.check_stdout(c, code, out)
            if bad_out:
                problems.append(bad_out)
            ok = not problems
            failed += not ok
            log('%-*s  cursive=%-10s  ours=%-3d  %s' % (
                width, c.name, cv['verdict'], code,
                ('ok' if ok else 'MISMATCH') + (
                    '  (differs by design: %s)' % c.differs_by_design
                    if c.differs_by_design else '')))
            if not ok or self.args.verbose:
                if cv['error']:
                    log('    cursive: %s at %s: %s' % (
                        cv['error'], cv['stage'], cv['message']))
                for p in problems:
                    log('    ' + p)
                if c.why:
                    log('    note: ' + c.why)
                if err.strip():
                    log('    ours stderr: ' + err.strip()[-600:].replace(
                        '\n', '\n    '))
        if self.bin is not None:
            log('luks-agent: %d runs in %.1f s' % (len(self.cases),
                                                   time.monotonic() - t0))
        return failed

    def cleanup(self) -> None:
        """Removes the work directory unless --keep."""
        if self.args.keep:
            log('kept %s' % self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def default_bin() -> str:
    """The newest of target/debug and target/release luks-agent."""
    found = [p for p in (ROOT / 'target' / 'debug' / 'luks-agent',
                         ROOT / 'target' / 'release' / 'luks-agent')
             if p.is_file()]
    if not found:
        return str(ROOT / 'target' / 'debug' / 'luks-agent')
    return str(max(found, key=lambda p: p.stat().st_mtime))


def main() -> int:
    ap = argparse.ArgumentParser(
        description='luks-agent image verify against cursive 0.3.1 '
                    '(real Barbican)')
    ap.add_argument('--bin', default=os.environ.get('LUKS_AGENT_BIN') or
                    default_bin(),
                    help='luks-agent binary (default: the newer of '
                         'target/debug and target/release)')
    ap.add_argument('--state', default=str(DEFAULT_STATE),
                    help='openstack.py state directory (started if needed)')
    ap.add_argument('--only', help='run only cases whose name matches '
                                   'this regular expression')
    ap.add_argument('--expect', action='append', default=[],
                    metavar='CASE=CODE',
                    help='override the exit code a case expects (to check '
                         'that the test fails)')
    ap.add_argument('--cursive-only', action='store_true',
                    help='no luks-agent: check only that cursive gives '
                         'every case the verdict it expects (exit 0 then '
                         'proves nothing about luks-agent)')
    ap.add_argument('--keep', action='store_true',
                    help='keep the work directory (keys, images, configs)')
    ap.add_argument('-v', '--verbose', action='store_true',
                    help='print the details of passing cases too')
    args = ap.parse_args()
    overrides = {}
    for e in args.expect:
        name, _, code = e.partition('=')
        try:
            overrides[name] = int(code)
        except ValueError:
            ap.error('--expect takes CASE=CODE')

    t0 = time.monotonic()
    c = Compat(args)
    try:
        c.preflight()
        log('luks-agent: %s' % (c.bin or 'NOT RUN (--cursive-only)'))
        log('cursive venv: %s' % c.python.parent.parent)
        log('barbican: %s' % c.cloud['barbican']['endpoint'])
        c.build()
        if args.only:
            c.cases = [x for x in c.cases if re.search(args.only, x.name)]
            if not c.cases:
                raise SetupError('--only %r matches no case' % args.only)
        unknown = set(overrides) - {x.name for x in c.cases}
        if unknown:
            raise SetupError('--expect names unknown cases: %s'
                             % ', '.join(sorted(unknown)))
        for x in c.cases:
            if x.name in overrides:
                x.ours = (overrides[x.name],)
        verdicts = c.run_cursive()
        failed = c.compare(verdicts)
    except SetupError as e:
        log('CANNOT RUN: %s' % e)
        log('0 passed, 1 failed')
        return 2
    finally:
        c.cleanup()
    log('image signature compatibility with cursive 0.3.1: %d cases, '
        '%.0f s' % (len(c.cases), time.monotonic() - t0))
    log('%d passed, %d failed' % (len(c.cases) - failed, failed))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
