"""Warm start: template snapshots per machine shape and the clones restored from them.

- ``templates``: the shape of a VM (its argv with the workspace's own disks and sockets taken out), where a
  shape's template lives (``<state-dir>/templates/<key>/``, its RAM file on tmpfs), and whether it can be used
- ``qmp``: a blocking QMP session that can pass descriptors (``getfd``) and wait for a migration
- ``shim``: the LD_PRELOAD shim that lets a clone's QEMU map the template's RAM file read-only
"""
