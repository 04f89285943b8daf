"""The reference blkif frontend and backend, written against `blkif_spec.xen.api` only."""
