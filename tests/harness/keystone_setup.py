"""Runs several keystone-manage commands in one interpreter.

Usage: python keystone_setup.py CONFIG_FILE 'cmd arg ...' ['cmd arg ...' ...]

Each keystone-manage run costs seconds of imports; the harness needs five of
them (db_sync, fernet_setup, receipt_setup, credential_setup, bootstrap), so
they share one process here.  Exits with the first non-zero status.
"""
import shlex
import sys

from keystone.cmd import cli


def main():
    conf, commands = sys.argv[1], sys.argv[2:]
    for command in commands:
        args = shlex.split(command)
        print('$ keystone-manage %s' % command, flush=True)
        # Lets cli.main() register and parse its options again.
        cli.CONF.clear()
        try:
            cli.main(argv=['keystone-manage', '--config-file', conf] + args)
        except SystemExit as e:
            if e.code not in (None, 0):
                sys.exit(e.code)


if __name__ == '__main__':
    main()
