"""Xen services for the suite: the simulated xenstored and the XenStore client wrapper."""
