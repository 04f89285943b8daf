"""The suite's pytest plugin: options, markers, hypothesis profiles, rule-ID checks.

Registered once, by the root `conftest.py` (`pytest_plugins`); a `pytest11`
entry point as well would make pytest abort with "option already added".
Option names follow conventions §2; a wrong value is a usage error naming the
option and the accepted values, raised before any test runs.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from blkif_spec import catalogue, consts, targets
from blkif_spec import report as report_mod
from blkif_spec.errors import RuleViolation

DEFAULT_HEADER = Path("/usr/include/xen/io/blkif.h")
_TARGET = re.compile(r"^(reference|live|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")

# Profiles are registered at import, before hypothesis' own plugin applies
# --hypothesis-profile in pytest_configure; `ci` is the default (conventions §8).
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile("dev", max_examples=15, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True)
settings.register_profile(
    "live", max_examples=5, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.register_profile(
    "selfcheck", max_examples=10, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate], suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.load_profile("ci")


def _target(value: str) -> str:
    if not _TARGET.match(value):
        raise pytest.UsageError(
            f"--backend/--frontend: {value!r} is not one of reference, live or MODULE:FACTORY"
        )
    return value


def _abi(value: str) -> str:
    if value not in consts.ABIS:
        raise pytest.UsageError(f"--blkif-abi: {value!r} is not one of {', '.join(consts.ABIS)}")
    return value


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise pytest.UsageError(f"--blkif-timeout: {value!r} is not a positive number of seconds")
    return seconds


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("blkif", "blkif conformance")
    group.addoption("--backend", default="reference", type=_target,
                    help="backend under test: reference (default), live, or MODULE:FACTORY")  # fmt: skip
    group.addoption("--frontend", default="reference", type=_target,
                    help="frontend under test: reference (default), live, or MODULE:FACTORY")  # fmt: skip
    group.addoption("--blkif-strict", action="store_true", dest="blkif_strict",
                    help="also enforce SHOULD rules (report them as failures)")  # fmt: skip
    group.addoption("--blkif-timeout", type=_timeout, default=None,
                    help="bound on every wait on a target, s (default 2 simulated, 10 live)")  # fmt: skip
    group.addoption("--blkif-abi", type=_abi, default=consts.X86_64_ABI, dest="blkif_abi",
                    help="ABI the suite's own peer speaks: " + ", ".join(consts.ABIS))  # fmt: skip
    group.addoption("--blkif-header", type=Path, default=None, dest="blkif_header",
                    help=f"C blkif.h for the layout check (default {DEFAULT_HEADER})")  # fmt: skip
    group.addoption("--conformance-report", type=Path, default=None, dest="conformance_report",
                    help="write report.json and report.md into this directory")  # fmt: skip
    group.addoption("--blkif-role", choices=("backend", "frontend"), default=None, dest="blkif_role",
                    help="run only tests of this role (the role marker)")  # fmt: skip
    group.addoption("--blkif-rules", default=None, dest="blkif_rules",
                    help="run only tests marked with one of these rule IDs (comma-separated)")  # fmt: skip
    group.addoption("--known-failures", type=Path, default=None, dest="known_failures",
                    help="TOML file of accepted divergences")  # fmt: skip
    live = parser.getgroup("blkif-live", "blkif live mode (--backend=live / --frontend=live, root in dom0)")
    live.addoption("--xen-device", default=None, dest="xen_device",
                   help="the block device the live run may overwrite (required)")  # fmt: skip
    live.addoption("--xen-backend-domid", type=int, default=0, dest="xen_backend_domid",
                   help="domain of the backend under test (default 0)")  # fmt: skip
    live.addoption("--xen-backend-kind", choices=("vbd", "qdisk"), default="vbd", dest="xen_backend_kind",
                   help="vbd: Linux blkback (default); qdisk: QEMU xen-block")  # fmt: skip
    live.addoption("--xen-vdev", default="xvdf", dest="xen_vdev",
                   help="virtual device the suite creates (default xvdf; must not exist)")  # fmt: skip
    live.addoption("--xen-allow-dataloss", action="store_true", dest="xen_allow_dataloss",
                   help="accept a device that is mounted, in use or holds a filesystem")  # fmt: skip
    live.addoption("--xen-allow-host-crash", action="store_true", dest="xen_allow_host_crash",
                   help="also run the tests marked host_hazard, which have crashed a real driver in dom0's "
                        "kernel: only on a disposable host (the lab runs them in its last job)")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "rule(*ids): the inventory rule IDs a test checks; levels come from the catalogue",
        "role(name): the role under test, backend or frontend",
        "needs(*features): features the target must offer, else SKIP with the reason",
        "run_last(reason, order=0): against a live backend this test runs after the others, by order "
        "(it may leave a real backend unusable)",
        "provokes(*regexes): driver complaints in dmesg the test provokes on purpose (live runs)",
        "host_hazard(reason): against a live target this test may crash dom0's kernel; it is skipped "
        "unless --xen-allow-host-crash, and then runs after all the others",
    ):
        config.addinivalue_line("markers", line)
    run = _Run(config)
    config.stash[_RUN_KEY] = run
    config.pluginmanager.register(run, "blkif-run")


def rule_ids(item: pytest.Item) -> tuple[str, ...]:
    """The rule IDs of every `rule` marker on a test, in order."""
    return tuple(rid for mark in item.iter_markers("rule") for rid in mark.args)


def _selected(marked: tuple[str, ...], wanted: set[str]) -> bool:
    """A test checks a wanted rule directly, as a sub-clause of it, or as its parent."""
    return any(r in wanted or r.split(".", 1)[0] in wanted or any(w.split(".", 1)[0] == r for w in wanted)
               for r in marked)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """An unknown rule ID in a marker is a collection error, not a silently untested rule."""
    bad = [f"{item.nodeid}: {rid!r}" for item in items for rid in rule_ids(item) if not catalogue.known(rid)]
    if bad:
        raise pytest.UsageError("unknown rule IDs in @pytest.mark.rule (not in the catalogue):\n  "
                                + "\n  ".join(bad))  # fmt: skip
    role = config.getoption("blkif_role")
    if role:
        keep = [item for item in items if any(m.args[:1] == (role,) for m in item.iter_markers("role"))]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    wanted = config.getoption("blkif_rules")
    if wanted:
        ids = {r.strip() for r in wanted.split(",") if r.strip()}
        unknown = sorted(r for r in ids if not catalogue.known(r))
        if unknown:
            raise pytest.UsageError(f"--blkif-rules: unknown rule IDs {', '.join(unknown)}")
        keep = [item for item in items if _selected(rule_ids(item), ids)]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    if "live" in (config.getoption("backend"), config.getoption("frontend")):
        # Tests that may leave a real backend unusable (QEMU 7.2 after a read-only vbd, or after a
        # ring near 2^32) go after all the others, so that one finding does not hide the rest; tests
        # that may crash dom0's kernel run only when allowed, and last of all.
        allowed = config.getoption("xen_allow_host_crash")
        for item in items:
            reason = host_hazard_skip(item, allowed)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        items.sort(key=_run_last_rank)


def host_hazard_skip(item: pytest.Item, allowed: bool) -> str | None:
    """Why a live run skips this test (it may crash dom0's kernel and was not allowed to), or None."""
    mark = item.get_closest_marker("host_hazard")
    if mark is None or allowed:
        return None
    return (f"may crash dom0's kernel ({mark.args[0] if mark.args else 'host_hazard'}); "
            "run it with --xen-allow-host-crash on a disposable host only")  # fmt: skip


def _run_last_rank(item: pytest.Item) -> tuple[int, int]:
    if item.get_closest_marker("host_hazard") is not None:
        return (2, 0)
    mark = item.get_closest_marker("run_last")
    return (0, 0) if mark is None else (1, int(mark.kwargs.get("order", 0)))


# -- the C header under review (layout check, WIRE-1/3/4) --------------------------------------


def multilib_expected() -> bool:
    """Whether -m32 must work here: in CI, or where gcc-multilib is installed (Debian)."""
    return bool(os.environ.get("CI")) or any(Path("/var/lib/dpkg/info").glob("gcc-multilib*.list"))


@pytest.fixture(scope="session")
def blkif_header(request: pytest.FixtureRequest) -> Path:
    """`--blkif-header`, or libxen-dev's header; SKIP only when gcc or the default header is missing."""
    option = request.config.getoption("blkif_header", default=None)
    path = Path(option) if option else DEFAULT_HEADER
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (apt-get install gcc): the layout check needs a C compiler")
    if not path.is_file():
        if option:
            pytest.fail(f"--blkif-header {path}: no such file")
        pytest.skip(f"{path} not found: install libxen-dev, or pass --blkif-header=PATH")
    return path.resolve()


@pytest.fixture(scope="session")
def blkif_layout(blkif_header: Path):
    """The layout check of the header under review, run once per session."""
    from blkif_spec import layout

    return layout.check_header(blkif_header)


def require_abi(result, abi: str) -> None:
    """Skip an ABI the host cannot build, except x86_32 where gcc-multilib is installed (CI)."""
    if abi in result.abis:
        return
    reason = result.skipped_abis.get(abi, "not checked")
    if abi == consts.X86_32_ABI and multilib_expected():
        pytest.fail(f"gcc-multilib is installed but x86_32-abi was not checked: {reason}")
    pytest.skip(f"{abi}: {reason}")


# -- targets, verdicts and the conformance report ------------------------------------------------


@dataclass
class KnownFailure:
    rule: str
    reason: str
    target: str = "*"
    test: str = "*"
    used: bool = False


def _load_known_failures(path: Path | None) -> list[KnownFailure]:
    if path is None:
        return []
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"--known-failures {path}: {exc}") from None
    entries = []
    for i, entry in enumerate(data.get("accept", [])):
        rule = entry.get("rule")
        if not isinstance(rule, str) or not catalogue.known(rule):
            raise pytest.UsageError(f"--known-failures {path}: [[accept]] #{i + 1}: unknown rule {rule!r}")
        if not entry.get("reason"):
            raise pytest.UsageError(f"--known-failures {path}: [[accept]] #{i + 1} ({rule}): reason missing")
        entries.append(KnownFailure(rule, entry["reason"], entry.get("target", "*"), entry.get("test", "*")))
    return entries


class _Run:
    """Per-session state on the controller: targets, known failures, collected results."""

    def __init__(self, config: pytest.Config) -> None:
        self.strict = bool(config.getoption("blkif_strict"))
        self.timeout = config.getoption("blkif_timeout") or 2.0
        self.abi = config.getoption("blkif_abi")
        self.specs = {role: config.getoption(role) for role in ("backend", "frontend")}
        try:
            self.factories = {role: targets.load(spec, role) for role, spec in self.specs.items()}
        except LookupError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.known = _load_known_failures(config.getoption("known_failures"))
        self.report = report_mod.Report(
            targets={role: {"kind": "module" if ":" in spec else spec, "name": spec, "versions": {}}
                     for role, spec in self.specs.items()},
            strict=self.strict,
        )  # fmt: skip
        self.started = time.monotonic()
        self.live = self.snapshot = self.kernel_log = None
        if "live" in self.specs.values():
            self._start_live(config)

    def _start_live(self, config: pytest.Config) -> None:
        """Safety checks (LiveRefused -> usage error), then the XenStore snapshot to compare at the end."""
        from blkif_spec import live
        from blkif_spec.xen.live import LiveDomain, preflight

        self.live = live.LiveOptions(
            config.getoption("xen_device"), config.getoption("xen_backend_domid"),
            config.getoption("xen_backend_kind"), config.getoption("xen_vdev"),
            config.getoption("xen_allow_dataloss"),
        )  # fmt: skip
        try:
            if self.specs["backend"] == "live":
                live.check_safe(self.live)
            elif preflight():
                raise live.LiveRefused("live mode needs root in a Xen dom0: " + "; ".join(preflight()))
            self.live.vbd()
        except live.LiveRefused as exc:
            raise pytest.UsageError(str(exc)) from None
        self.timeout = config.getoption("blkif_timeout") or 10.0
        self._snapshot_domain = LiveDomain(timeout=self.timeout)
        self.snapshot = live.XenStoreSnapshot(self._snapshot_domain.store)
        from blkif_spec.kernel_log import KernelLog

        self.kernel_log = KernelLog()  # the dmesg oracle (conventions §7)
        if self.specs["backend"] == "live":
            versions = live.versions(self.live.backend_kind, self._snapshot_domain.store)
            self.report.targets["backend"] = {"kind": "live", "name": live.KINDS[self.live.backend_kind],
                                              "versions": versions}  # fmt: skip
        if self.specs["frontend"] == "live":
            self.report.targets["frontend"] = {"kind": "live", "name": "Linux xen-blkfront",
                                               "versions": {"linux": os.uname().release}}  # fmt: skip

    def environment(self, role: str, **kwargs: Any) -> Any:
        """A harness environment for `role`'s target: simulated, or live on this host."""
        from blkif_spec.harness import BackendUnderTest, FrontendUnderTest

        if self.specs[role] == "live":
            return self.live_env(role, **kwargs)
        if role == "backend":
            return BackendUnderTest(self.factories[role], abi=kwargs.pop("abi", self.abi), **kwargs)
        return FrontendUnderTest(self.factories[role], **kwargs)

    def live_env(self, role: str, **kwargs: Any) -> Any:
        """The live harness of `role`: dom0's blkback/qdisk, or dom0's kernel blkfront."""
        if role == "backend":
            from blkif_spec.live import LiveBackendUnderTest

            return LiveBackendUnderTest(self.live, abi=kwargs.pop("abi", self.abi), **kwargs)
        from blkif_spec.live_frontend import LiveFrontendUnderTest

        return LiveFrontendUnderTest(self.live, **kwargs)

    def target_name(self, role: str) -> str:
        """The name known-failure entries match: the spec, or for live mode `live:vbd`, `live:qdisk`
        (the backend kind) and `live:blkfront`."""
        if self.specs[role] == "live" and self.live is not None:
            return f"live:{self.live.backend_kind}" if role == "backend" else "live:blkfront"
        return self.specs[role]

    def reproduce(self, nodeid: str) -> str:
        opts = " ".join(f"--{role}={spec}" for role, spec in self.specs.items() if spec != "reference")
        return f"pytest '{nodeid}' {opts}".strip()

    # -- hooks of the controller (registered as a plugin in pytest_configure) ----------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        info = next((v for k, v in report.user_properties if k == "blkif"), None)
        if info is None:
            return
        variants = dict(v for k, v in report.user_properties if k == "variant")
        for key, value in report.user_properties:
            if key == "negotiated" and self.report.negotiated is None:
                self.report.negotiated = value
        message = None
        if info["verdict"] in ("fail", "timeout", "error", "warn", "known"):
            message = str(report.longrepr)[-4000:]
        elif info["verdict"] == "skip" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        failed = info["verdict"] in ("fail", "timeout", "error")
        self.report.tests.append(report_mod.TestResult(
            report.nodeid, report.outcome, info["verdict"], info["rules"], report.duration, message,
            self.reproduce(report.nodeid) if failed else None, variants,
        ))  # fmt: skip

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):
            return  # xdist worker: the controller writes the report
        self.report.duration_s = time.monotonic() - self.started
        if self.snapshot is not None:
            from blkif_spec import live

            live.tidy(self.snapshot, self.live)  # parents a driver re-created after a test's own cleanup
            if self.specs["frontend"] == "live":
                from blkif_spec.live_frontend import unload_blkfront

                problem = unload_blkfront()  # loaded by this run: dom0 is left as it was found
                if problem:
                    print(f"blkif live: {problem}")
            diff = self.snapshot.diff()
            for role, spec in self.specs.items():
                if spec == "live":
                    self.report.targets[role]["xenstore_diff"] = diff
            self._snapshot_domain.close()
            self.kernel_log.close()
            if diff:  # live mode must leave the host as it found it
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
                print("blkif live: XenStore differs after the run:\n  " + "\n  ".join(diff[:40]))
        directory = session.config.getoption("conformance_report")
        if directory is not None:
            self.report.write(directory)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.report.tests:
            return
        rows = self.report.rules()
        tested = [r for r in rows if r["verdict"] != "untested"]
        summary = self.report.summary([r for r in rows if r["enforcement"] != "harness"])
        tr = terminalreporter
        tr.section("blkif conformance")
        tr.write_line(f"backend: {self.specs['backend']}   frontend: {self.specs['frontend']}   "
                      f"rules exercised: {len(tested)} of {len(rows)}")  # fmt: skip
        shown = [v for v in report_mod.VERDICTS if any(c.get(v) for c in summary.values())]
        tr.write_line(f"{'':<12}" + "".join(f"{v:>9}" for v in shown))
        for key in sorted(summary, key=lambda k: (k.startswith("area:"), k)):
            counts = summary[key]
            tr.write_line(
                f"{key.removeprefix('area:'):<12}" + "".join(f"{counts.get(v, 0):>9}" for v in shown)
            )
        for row in rows:
            if row["verdict"] in ("fail", "timeout", "error", "warn"):
                tr.write_line(f"{row['verdict'].upper():<8} {row['id']:<10} {row['summary']}")
        targets = [self.target_name(role) for role in ("backend", "frontend")]
        ran = [t for t in self.report.tests if t.verdict != "skip"]
        for entry in self.known:  # an entry for a target, or tests, this run did not run says nothing
            if (
                not entry.used
                and any(fnmatch.fnmatch(t, entry.target) for t in targets)
                and any(entry.rule in t.rules and fnmatch.fnmatch(t.nodeid, entry.test) for t in ran)
            ):
                tr.write_line(f"known-failures: {entry.rule} accepted but passing: remove the entry")


_RUN_KEY = pytest.StashKey[_Run]()


def _run(config: pytest.Config) -> _Run:
    return config.stash[_RUN_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = _run(config)
    return [f"blkif: backend={run.specs['backend']} frontend={run.specs['frontend']} abi={run.abi} "
            f"timeout={run.timeout:g}s strict={run.strict}"]  # fmt: skip


def _factory_fixture(request: pytest.FixtureRequest, role: str) -> Iterator[Callable[..., Any]]:
    run = _run(request.config)
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        env = run.environment(role, timeout=run.timeout, **kwargs)
        made.append(env)
        return env

    yield make
    errors = []
    for env in made:
        try:
            env.close()
        except Exception as exc:  # reported after every environment got its chance to close
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def backend_under_test(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """`make(**options)` -> a `BackendUnderTest` of `--backend` (closed after the test)."""
    yield from _factory_fixture(request, "backend")


@pytest.fixture
def frontend_under_test(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """`make(**options)` -> a `FrontendUnderTest` of `--frontend` (closed after the test)."""
    yield from _factory_fixture(request, "frontend")


# Module-scoped twins, for one observation that several tests judge (each with its own rules
# and verdict): a recorded startup, or a series of hostile negotiations run back to back. The
# module's fixture records what it saw and closes its environments; tests never share a live one.


@pytest.fixture(scope="module")
def shared_backend_under_test(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Like `backend_under_test`, closed at the end of the module."""
    yield from _factory_fixture(request, "backend")


@pytest.fixture(scope="module")
def shared_frontend_under_test(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Like `frontend_under_test`, closed at the end of the module."""
    yield from _factory_fixture(request, "frontend")


@pytest.fixture
def record_variant(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """Record which listed variant of a `variant` rule the target showed (conventions §4)."""

    def record(rule_id: str, variant: str) -> None:
        catalogue.get(rule_id)
        request.node.user_properties.append(("variant", (rule_id, variant)))

    return record


@pytest.fixture
def record_negotiated(request: pytest.FixtureRequest) -> Callable[[Any], None]:
    def record(negotiated: Any) -> None:
        request.node.user_properties.append(("negotiated", negotiated.as_report()))

    return record


_SETUP_LINES = pytest.StashKey[list]()


def _dmesg_oracle(log: Any, item: pytest.Item, report: pytest.TestReport) -> None:
    """Judge what the kernel and Xen logged: setup and call together (a module's shared observation
    runs in its first test's setup), teardown on its own, with Xen's console ring of the whole test.
    A passed phase the log condemns fails."""
    from blkif_spec.kernel_log import judge

    lines = log.read(xen=report.when == "teardown")
    if report.when == "setup" and report.passed:
        item.stash[_SETUP_LINES] = lines
        return
    if report.when == "call":
        lines = item.stash.get(_SETUP_LINES, []) + lines
    provoked = [p for mark in item.iter_markers("provokes") for p in mark.args]
    found = judge(lines, provoked)
    if found.lines:
        report.sections.append((f"kernel log ({report.when})", "\n".join(str(line) for line in found.lines)))
    if found.failed and report.passed:
        report.outcome = "failed"
        report.longrepr = found.message()
        # _verdict: a fail, not an error; a crash fails whatever the level of the test's rules
        report.blkif_dmesg = "crash" if found.fatal else "complaint"  # type: ignore[attr-defined]
    elif found.fatal and report.failed:
        # A crash outranks what it caused (a timeout, an error in teardown): the verdict is fail.
        report.sections.append(("dmesg oracle", found.message()))
        report.blkif_dmesg = "crash"  # type: ignore[attr-defined]


def _verdict(item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport) -> str:
    from blkif_spec.xen.api import XenTimeout

    if getattr(report, "blkif_dmesg", False):
        return "fail"
    if report.passed:
        return "pass"
    if report.skipped:
        return "skip"
    exc = call.excinfo.value if call.excinfo else None
    if isinstance(exc, BaseExceptionGroup):
        # hypothesis' FlakyFailure: a nondeterministic target failed, then passed on replay.
        # Judge what it raised when it failed (a fail stays a fail, a timeout a timeout).
        leaves = [e for e in exc.exceptions if not isinstance(e, BaseExceptionGroup)]
        if leaves and all(isinstance(e, XenTimeout) for e in leaves):
            exc = leaves[0]
        elif leaves and all(isinstance(e, (AssertionError, RuleViolation)) for e in leaves):
            exc = leaves[0]
    if isinstance(exc, XenTimeout):
        return "timeout"
    if report.when != "call" or not isinstance(exc, (AssertionError, RuleViolation)):
        return "error"
    return "fail"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report: pytest.TestReport = yield
    rules = list(rule_ids(item))
    run = _run(item.config)
    if run.kernel_log is not None:
        _dmesg_oracle(run.kernel_log, item, report)
    if report.when == "call" or (report.when == "setup" and not report.passed) or report.failed:
        verdict = _verdict(item, call, report)
        if verdict in ("fail", "timeout", "error") and rules:
            enforcements = {catalogue.get(r).enforcement for r in rules}
            lenient = not run.strict and getattr(report, "blkif_dmesg", None) != "crash"
            if verdict == "fail" and enforcements <= {"should", "info", "harness"} and lenient:
                verdict = "warn"
            elif _accepted(run, item, rules):
                verdict = "known"
            if verdict in ("warn", "known"):
                report.sections.append((f"blkif {verdict}", str(report.longrepr)))
                report.outcome = "passed"
        if report.failed and rules:
            hint = "  (hypothesis prints @reproduce_failure when it applies)"
            report.sections.append(("reproduce", run.reproduce(item.nodeid) + hint))
        report.user_properties.append(("blkif", {"verdict": verdict, "rules": rules}))
    return report


def _accepted(run: _Run, item: pytest.Item, rules: list[str]) -> bool:
    for entry in run.known:
        if (
            entry.rule in rules
            and fnmatch.fnmatch(item.nodeid, entry.test)
            and any(fnmatch.fnmatch(run.target_name(role), entry.target) for role in ("backend", "frontend"))
        ):
            entry.used = True
            return True
    return False
