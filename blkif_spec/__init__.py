"""blkif-conformance: the Xen PV block protocol as executable spec, and its conformance suite."""

__version__ = "0.1.0"
