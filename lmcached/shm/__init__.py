"""The same-host shared-memory data plane: what client and worker both need to know.

:mod:`lmcached.shm.layout` describes a worker's arena file (its header, the descriptor table
and the payload area) and reads it safely; :mod:`lmcached.shm.files` creates and maps such a
file, or a client's staging file; :mod:`lmcached.shm.addresses` gives the address of a
buffer's bytes, for copies by address on either side. Server code (the allocator) lives in
:mod:`lmcached.storage.arena`; client code in :mod:`lmcached.client.shared`. This package
imports neither, so a client process loads no server code. See docs/same-host.md.
"""
