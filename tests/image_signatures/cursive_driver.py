#!/usr/bin/env python3
"""cursive's verdict on signed images, as nova reaches it.

Runs in the cursive venv (tests/harness/pyvenv.sh cursive), never in the
system Python: it imports cursive 0.3.1, castellan and cryptography.

  cursive_driver.py compat JOB.json
      For every case of the job, what nova's image download does
      (nova/image/glance.py, `_get_verifier` then `_verify_and_write`):
      `signature_utils.get_verifier(...)` with the four image properties
      (missing ones as None); with trusted certificate ids,
      `certificate_utils.verify_certificate(...)`; then the image in
      glanceclient's chunks into `verifier.update()` and
      `verifier.verify()`. The
      certificates come from the real Barbican through castellan's Barbican
      key manager, authenticated with the caller's Keystone token in an
      oslo.context RequestContext, as in nova. Prints one JSON object per
      case on stdout.

  cursive_driver.py verify-file --cert PEM --file IMAGE --properties JSON
                                [--feed nova|nova-file|cinder]
      One verification of IMAGE with the certificate loaded from a PEM file
      (no key manager: `signature_utils.get_certificate` returns it, the
      rest of `get_verifier` runs unchanged). Prints a JSON object; exit 0
      verified, 14 signature mismatch, 2 any other refusal.

A case's verdict is "verified", "not_signed" (none of the four properties:
`should_create_verifier` is false, so glance and cinder do not verify) or
"rejected"; `stage` says where a rejection came from (get_verifier,
verify_certificate, verify) and `error` names the exception.
"""

import argparse
import json
import sys
import time
import typing

from cryptography import exceptions as crypto_exceptions
from cryptography import x509

PROPERTY_NAMES = ('img_signature', 'img_signature_hash_method',
                  'img_signature_key_type', 'img_signature_certificate_uuid')
# How each caller feeds cursive's verifier (`--feed`):
#   nova       the chunks of glanceclient's download iterator: CHUNKSIZE,
#              1 MiB in python-glanceclient 4.13 (nova/image/glance.py,
#              `_verify_and_write`)
#   nova-file  nova's direct download of a `file://` location: the
#              downloaded file object itself is iterated, which yields its
#              lines (glance_utils.IterableWithLength(fh, ...))
#   cinder     cinder/image/image_utils.py `_verify_image`: img_file.read(1024)
FEEDS = ('nova', 'nova-file', 'cinder')
CHUNK = 1024 * 1024
CINDER_CHUNK = 1024


def chunks(f: typing.BinaryIO, feed: str) -> typing.Iterator[bytes]:
    """The pieces of the open image file `f` as the caller `feed` hands
    them to `verifier.update()`."""
    if feed == 'nova-file':
        yield from f
        return
    size = CINDER_CHUNK if feed == 'cinder' else CHUNK
    while True:
        data = f.read(size)
        if not data:
            return
        yield data


def verify_image(context: typing.Any, properties: dict, path: str,
                 trusted: typing.Optional[list], feed: str = 'nova') -> dict:
    """One image through cursive as nova drives it; returns the verdict."""
    from cursive import certificate_utils
    from cursive import signature_utils

    if not any(k in properties for k in PROPERTY_NAMES):
        assert not signature_utils.should_create_verifier(properties)
        return {'verdict': 'not_signed', 'stage': 'should_create_verifier',
                'error': None, 'message': 'no signature properties'}
    stage = 'get_verifier'
    try:
        verifier = signature_utils.get_verifier(
            context=context,
            img_signature_certificate_uuid=properties.get(
                'img_signature_certificate_uuid'),
            img_signature_hash_method=properties.get(
                'img_signature_hash_method'),
            img_signature=properties.get('img_signature'),
            img_signature_key_type=properties.get('img_signature_key_type'),
        )
        if trusted:
            stage = 'verify_certificate'
            certificate_utils.verify_certificate(
                context=context,
                certificate_uuid=properties.get(
                    'img_signature_certificate_uuid'),
                trusted_certificate_uuids=trusted)
        stage = 'verify'
        n = 0
        with open(path, 'rb') as f:
            for data in chunks(f, feed):
                n += len(data)
                verifier.update(data)
        verifier.verify()
    except crypto_exceptions.InvalidSignature as e:
        return {'verdict': 'rejected', 'stage': stage,
                'error': 'InvalidSignature', 'message': str(e)}
    except Exception as e:  # every refusal, whatever cursive raised
        return {'verdict': 'rejected', 'stage': stage,
                'error': type(e).__name__, 'message': str(e)[:300]}
    return {'verdict': 'verified', 'stage': 'verify', 'error': None,
            'message': None, 'bytes': n}


def cmd_compat(args: argparse.Namespace) -> int:
    """Every case of the job file against Barbican; JSON lines out."""
    with open(args.job) as f:
        job = json.load(f)
    from castellan import options as castellan_options
    from oslo_config import cfg
    from oslo_context import context as oslo_context

    # nova's [key_manager] and [barbican] options: the Barbican backend,
    # Keystone for the token plugin, the endpoint from the catalog.
    cfg.CONF([], project='cursive-compat', default_config_files=[])
    castellan_options.set_defaults(
        cfg.CONF, backend='barbican', auth_endpoint=job['auth_url'],
        barbican_endpoint_type='public')
    contexts = {}
    for case in job['cases']:
        user = case.get('user', 'alice')
        if user not in contexts:
            u = job['users'][user]
            contexts[user] = oslo_context.RequestContext(
                auth_token=u['token'], project_id=u['project_id'])
        t0 = time.monotonic()
        out = verify_image(contexts[user], case['properties'], case['file'],
                           case.get('trusted'), job.get('feed', 'nova'))
        out['name'] = case['name']
        out['seconds'] = round(time.monotonic() - t0, 3)
        print(json.dumps(out), flush=True)
    return 0


def cmd_verify_file(args: argparse.Namespace) -> int:
    """One image, certificate from a PEM file, no key manager."""
    from cursive import signature_utils

    with open(args.cert, 'rb') as f:
        certificate = x509.load_pem_x509_certificate(f.read())

    def get_certificate(context: typing.Any, uuid: str) -> x509.Certificate:
        return certificate

    signature_utils.get_certificate = get_certificate
    with open(args.properties) as f:
        properties = json.load(f)
    out = verify_image(None, properties, args.file, None, args.feed)
    print(json.dumps(out))
    if out['verdict'] == 'verified':
        return 0
    return 14 if out['error'] == 'InvalidSignature' else 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    sp = sub.add_parser('compat', help='every case of a job file')
    sp.add_argument('job')
    sp.set_defaults(fn=cmd_compat)
    sp = sub.add_parser('verify-file', help='one image, certificate file')
    sp.add_argument('--cert', required=True)
    sp.add_argument('--file', required=True)
    sp.add_argument('--properties', required=True,
                    help='a JSON file of the image properties')
    sp.add_argument('--feed', choices=FEEDS, default='nova',
                    help='feed the verifier as this caller does (default '
                         'nova)')
    sp.set_defaults(fn=cmd_verify_file)
    args = p.parse_args()
    return args.fn(args)


if __name__ == '__main__':
    sys.exit(main())
