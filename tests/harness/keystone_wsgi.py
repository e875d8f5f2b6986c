"""Keystone's public WSGI application, for gunicorn.

The config directory comes from OS_KEYSTONE_CONFIG_DIR (set by openstack.py).
"""
import sys

# oslo.config parses sys.argv when it is not given arguments; gunicorn's own
# arguments would make it exit with status 2, and the gunicorn master would
# respawn the worker forever while the port still accepts connections.
sys.argv = sys.argv[:1]

from keystone.server import wsgi  # noqa: E402

application = wsgi.initialize_public_application()
