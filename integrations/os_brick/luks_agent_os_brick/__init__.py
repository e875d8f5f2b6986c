"""Encryptor classes for os-brick (nova-compute, cinder-volume) that hand
encrypted-volume attach, detach and extend to luks-agent over its Unix
socket. Class paths for a volume type's encryption provider:

- ``luks_agent_os_brick.encryptors.LuksEncryptor`` (LUKS1)
- ``luks_agent_os_brick.encryptors.Luks2Encryptor`` (LUKS2)
- ``luks_agent_os_brick.encryptors.PlainEncryptor`` (cryptsetup plain)

``luks_agent_os_brick.client`` is the agent's API client alone, with the
standard library only.
"""
