"""`python -m blkif_spec.lab run --out DIR …` (see cli.py)."""

from blkif_spec.lab.cli import main

raise SystemExit(main())
