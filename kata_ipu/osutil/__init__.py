"""The ground floor: small Linux helpers every part of the project may use.

Modules (one job each): :mod:`.unixsock` (claim a unix socket path, removing a stale socket
but never a live server's; the peer credentials of a connection), :mod:`.atomicfile`
(replace a file so a reader sees the old or the new content, optionally durably),
:mod:`.mountinfo` (mount-table queries), :mod:`.notify` (systemd ``sd_notify``).

Imports: the standard library and :mod:`kata_ipu.errors` only, so the daemon, the host side
(``shim_hooks``) and the test fixtures can all use it and it can import none of them. No
state; each call does its work and returns.
"""
