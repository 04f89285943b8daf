"""The catalogue of faulty implementations: each breaks exactly one named rule (issue: detection power).

Every fault is a small variation of the reference backend or frontend, loadable
as a target (`--backend=tests.faulty.backends:NAME`, `--frontend=tests.faulty.frontends:NAME`)
and registered with the rule it breaks, so the self-check can assert that the
suite fails it on a test tagged with that rule, and passes the reference.
"""
