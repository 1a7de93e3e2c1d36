"""``infron-dagster doctor``: check a lake's control files against its manifests, repair
what can be derived from them, and say what cannot.

The manifests are the truth of what was sent, paid and collected; budget entries and the
results/failed tables are truth too, but a budget entry can be derived again from the
``spend`` record of the manifest that owns it. The in-flight index, the admission ledgers,
the answers files and the locks are caches or coordination files, derived from manifests
(or judged by age). So the doctor

- reports an unreadable manifest or results/failed table (truth it cannot derive), naming
  the file and the remedy;
- writes missing in-flight markers and removes stale ones;
- rebuilds an admission ledger that is unreadable, foreign or disagrees with the manifests;
- rebuilds (else deletes) an unreadable answers file;
- rebuilds a damaged budget entry from its manifest's ``spend`` record (deletes it when no
  manifest records it: nothing was sent under it);
- releases the reservations of attempts that created nothing;
- deletes object-store locks whose holder stopped refreshing them.

Run ``--repair`` when no submission runs: a rebuilt admission ledger forgets the
reservations a running submission made and has not created yet.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:  # an empty lake
    ...     print(check_lake(root, repair=True).summary())
    /...: 0 pipeline(s), 0 finding(s): 0 repaired, 0 remaining (0 need a person)

The checks live by kind of file: :mod:`infron_dagster.doctor_lake` (the lake as read, and
the truth only a person repairs: manifests, tables; locks), :mod:`infron_dagster.doctor_caches`
(in-flight markers, admission ledgers, answers files) and :mod:`infron_dagster.doctor_money`
(budget entries, unpaid reservations). This module is the report and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .doctor_caches import check_admission, check_answers, check_inflight
from .doctor_lake import Finding, Lake, check_locks, check_manifests, check_tables, load_lake
from .doctor_money import check_budget_entries, check_unpaid

__all__ = ["DoctorReport", "Finding", "check_lake", "main"]

DEFAULT_GRACE_SECONDS = 600.0
DEFAULT_LOCK_STALE_SECONDS = 300.0  # BatchStorage.lock's default


# --- the report ----------------------------------------------------------------------------


@dataclass
class DoctorReport:
    """What :func:`check_lake` found and did.

    Example:
        >>> damaged = Finding("/data/lake/rev/manifests/partition=a/attempt=1.json",
        ...                   "manifest unreadable", remedy="restore this file")
        >>> report = DoctorReport("/data/lake", repair=False, pipelines=["rev"],
        ...                       findings=[damaged])
        >>> report.healthy, [f.file for f in report.remaining]
        (False, ['/data/lake/rev/manifests/partition=a/attempt=1.json'])
        >>> report.summary()
        '/data/lake: 1 pipeline(s), 1 finding(s): 0 repaired, 1 remaining (1 need a person)'
    """

    root: str
    repair: bool
    pipelines: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def remaining(self) -> list[Finding]:
        """The findings not repaired."""
        return [f for f in self.findings if not f.repaired]

    @property
    def healthy(self) -> bool:
        """True when nothing is left to repair (or nothing was wrong)."""
        return not self.remaining

    def summary(self) -> str:
        """One line: how many findings, repaired and remaining."""
        fixed = sum(f.repaired for f in self.findings)
        manual = sum(not f.repaired and not f.repairable for f in self.remaining)
        return (
            f"{self.root}: {len(self.pipelines)} pipeline(s), {len(self.findings)} finding(s): "
            f"{fixed} repaired, {len(self.remaining)} remaining ({manual} need a person)"
        )


# --- the whole check ---------------------------------------------------------------------------

# In repair order: locks before what takes them, markers before the ledger rebuilt from them.
CHECKS: tuple[Callable[[Lake], list[Finding]], ...] = (
    check_manifests,
    check_tables,
    check_locks,
    check_inflight,
    check_admission,
    check_budget_entries,
    check_unpaid,
    check_answers,
)


def check_lake(
    root: str,
    storage_options: dict[str, Any] | None = None,
    repair: bool = False,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    lock_stale_seconds: float = DEFAULT_LOCK_STALE_SECONDS,
) -> DoctorReport:
    """Check every pipeline under ``root`` against its manifests; with ``repair``, derive
    again what can be derived (see the module docstring). ``grace_seconds``: how old a file
    without its manifest must be before it is judged left over (a submission may be between
    the two writes). ``lock_stale_seconds``: the pipelines' lock staleness (300 s default).

    Example::

        report = check_lake("s3://lake/llm", {"anon": False}, repair=True)
        report.healthy
        # -> True
    """
    lake = Lake(str(root), dict(storage_options or {}), repair, grace_seconds, lock_stale_seconds)
    load_lake(lake)
    report = DoctorReport(str(root), repair, [p.name for p in lake.pipelines])
    for check in CHECKS:
        report.findings.extend(check(lake))
    return report


# --- the command ---------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` of ``--storage-option``: the value as JSON when it parses, else text.

    Example:
        >>> _option('client_kwargs={"endpoint_url": "http://127.0.0.1:9000"}')
        ('client_kwargs', {'endpoint_url': 'http://127.0.0.1:9000'})
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infron-dagster", description="Tools for an infron-dagster lake."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor",
        help="check a lake (manifests vs index vs ledgers vs files); --repair what derives",
        description=__doc__.split("Example:")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("storage_root", help="the pipelines' storage_root (a path or s3://...)")
    doctor.add_argument("--repair", action="store_true", help="repair what can be derived")
    doctor.add_argument(
        "--storage-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option (value parsed as JSON when it can be); repeatable",
    )
    doctor.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_SECONDS)
    doctor.add_argument("--lock-stale-seconds", type=float, default=DEFAULT_LOCK_STALE_SECONDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``infron-dagster doctor <storage_root> [--repair] [--storage-option key=value ...]``:
    one line per finding and a summary; exit code 0 when healthy (or all repaired), else 1.

    Example:
        $ infron-dagster doctor s3://lake/llm --repair --storage-option anon=false
    """
    args = _parser().parse_args(argv)
    report = check_lake(
        args.storage_root,
        dict(args.storage_option),
        repair=args.repair,
        grace_seconds=args.grace_seconds,
        lock_stale_seconds=args.lock_stale_seconds,
    )
    _print(report.findings, report)
    return 0 if report.healthy else 1


def _print(findings: Iterable[Finding], report: DoctorReport) -> None:
    for finding in findings:
        print(finding.line())
    print(report.summary())
    if not report.repair and any(f.repairable for f in report.remaining):
        print("run again with --repair to repair what can be derived")


if __name__ == "__main__":
    sys.exit(main())
