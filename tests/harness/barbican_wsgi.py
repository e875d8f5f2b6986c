"""Barbican's API WSGI application, for gunicorn.

The paste pipeline comes from BARBICAN_PASTE_INI; barbican.conf is read from
oslo.config's default locations, i.e. $HOME/.barbican/barbican.conf (HOME is
set by openstack.py).
"""
import os
import sys

# Same reason as in keystone_wsgi.py: keep gunicorn's arguments away from
# oslo.config.
sys.argv = sys.argv[:1]

from paste import deploy  # noqa: E402

application = deploy.loadapp('config:' + os.environ['BARBICAN_PASTE_INI'])
