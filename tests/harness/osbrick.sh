#!/bin/sh
# os-brick's venv (tests/harness/pyvenv.sh osbrick): kept under this name
# for the scripts and guides that call it.
exec "$(dirname "$0")/pyvenv.sh" osbrick "$@"
