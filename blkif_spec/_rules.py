"""Catalogue rows, one module per group of inventory sections (see `catalogue`)."""

from blkif_spec._rules_div_sec import RULES as _DIV_SEC
from blkif_spec._rules_wire import RULES as _WIRE
from blkif_spec._rules_xenbus import RULES as _XENBUS

RULES = _WIRE + _XENBUS + _DIV_SEC
