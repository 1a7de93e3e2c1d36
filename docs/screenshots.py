"""Regenerate the README's pictures of the Dagster UI: ``make screenshots`` (not part of CI).

What it does, start to end, all in throwaway folders (nothing in the repo but docs/images/):

1. Creates a temporary DAGSTER_HOME, results lake and embedded local-server folder, and sets the
   local server's timing so that batches finish in seconds.
2. Submits two days of reviews (``reviews`` and both ``_batches`` assets) into that instance.
3. Starts ``dagster dev`` on ``example_project.definitions`` on a free loopback port, with the
   sensors ticking every few seconds; the real sensors (in the real daemon) request the
   collection runs, which write results, failed rows and the completeness/failure_rate checks.
   ``review_topics`` is then materialized for those days, downstream of the results.
4. Makes the local server slow (a batch now takes minutes) and submits two more days: they stay
   in flight, and the sensor records their progress as observations on
   ``review_sentiment_batches``. Once that progress shows, the real ``review_sentiment_cancel``
   job cancels the later day, and the sensor collects it: the rows not finished land in
   ``review_sentiment_failed`` as ``batch_cancelled``.
5. Drives Debian's headless Chromium with Playwright through the UI and saves PNGs in
   docs/images/: asset-graph.png, live-progress.png, results-partition.png,
   checks-per-partition.png, failed-table.png, cancel-run.png (the cancel run's log) and
   cancelled-partition.png (the cancelled day's failed rows); a picture with a spinner, an
   error toast or a dialog over it fails the run instead of being saved.
6. Stops every process it started (also on error or Ctrl-C) and removes the temporary folders.

Setup (outside CI; playwright is deliberately not in the project's dev extras)::

    apt-get update && apt-get install -y chromium     # the browser: /usr/bin/chromium
    .venv/bin/python -m pip install playwright        # `make screenshots` does this if missing

Playwright's own browser download is not needed: the script launches /usr/bin/chromium
(``--chromium PATH`` or ``$CHROMIUM`` picks another). Run it as ``make screenshots`` or
``.venv/bin/python docs/screenshots.py``; ``--hold`` keeps the UI up after the pictures are taken
(its URL is printed) until Ctrl-C, to look around or debug a selector. Each picture is a
function in docs/screenshot_pages.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from screenshot_pages import (  # docs/, beside this script
    CANCELLED_DAY,
    COLLECTED_DAYS,
    IN_FLIGHT_DAY,
    log,
    take_pictures,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
# The local server's timing: fast for the collected days, slow for the day left in flight.
FAST = {"validating_seconds": 1.0, "in_progress_seconds": 2.0, "finalizing_seconds": 1.0}
SLOW = {"validating_seconds": 1.0, "in_progress_seconds": 300.0, "finalizing_seconds": 1.0}
# The in-flight day is pictured once its progress reads as progress.
MIN_PERCENT = 12.0
# Requests the local server fails: the first day breaches the 10 % failure-rate check.
FAILURE_RATES = {COLLECTED_DAYS[0]: 0.15}
FAILURE_RATE = 0.04
SENSOR_INTERVAL_SECONDS = 5
# In-process runs (submits, the cancel) keep their logs in the event log, not on this terminal.
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the state the pictures show -------------------------------------------------------------


def prepare_environment(tmp: Path) -> dict[str, str]:
    """Folders and environment for this run only; the local server starts fast."""
    home, lake, local = tmp / "dagster_home", tmp / "lake", tmp / "local_server"
    for folder in (home, lake, local):
        folder.mkdir(parents=True)
    # No python_log_level: it would keep the runs' INFO lines (what a cancel stopped) out of
    # the event log, so out of the run pages pictured; QUIET keeps them off this terminal.
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nnux:\n  enabled: false\n",
        encoding="utf-8",
    )
    env = {
        "DAGSTER_HOME": str(home),
        "INFRON_STORAGE_ROOT": str(lake),
        "INFRON_LOCAL_DATA_DIR": str(local),
        "INFRON_SENSOR_INTERVAL_SECONDS": str(SENSOR_INTERVAL_SECONDS),
    }
    for name in ("INFRON_API_KEY", "INFRON_BASE_URL", "INFRON_API_STYLE"):
        os.environ.pop(name, None)  # always the embedded local server: no key, no network
    os.environ.update(env)
    return env


def set_local_server(timing: dict[str, float], failure_rate: float) -> None:
    """Timing and faults are snapshotted into each batch when it is created: later batches get
    these, batches already created keep theirs."""
    from infron_dagster.local import LocalServerConfig, save_config

    save_config(
        os.environ["INFRON_LOCAL_DATA_DIR"],
        LocalServerConfig(**timing, failure_rate=failure_rate),
    )


def submit(day: str) -> None:
    """Materialize the day's reviews and both ``_batches`` assets: creates the batches."""
    import dagster as dg

    from example_project import definitions as ex

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [ex.reviews, ex.review_sentiment.batches_asset, ex.review_embeddings.batches_asset],
            partition_key=day,
            instance=instance,
            resources={"infron": ex.infron_resource()},
            raise_on_error=False,
            run_config=QUIET,
        )
    if not result.success:
        raise RuntimeError(f"submitting {day} failed")
    log(f"submitted {day}")


def materialize_topics(day: str) -> None:
    """``review_topics`` for a collected day: it loads the results as a DataFrame."""
    import dagster as dg

    from example_project import definitions as ex

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [ex.review_sentiment.collect_assets, ex.review_topics],
            selection=[ex.review_topics],
            partition_key=day,
            instance=instance,
            resources={"infron": ex.infron_resource()},
            raise_on_error=False,
            run_config=QUIET,
        )
    if not result.success:
        raise RuntimeError(f"review_topics {day} failed")


def collected(days: list[str]) -> bool:
    """Every day's results and failed tables of both pipelines are materialized, runs ended."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        for name in ("review_sentiment", "review_embeddings"):
            for kind in ("results", "failed"):
                done = instance.get_materialized_partitions(dg.AssetKey(f"{name}_{kind}"))
                if not set(days) <= set(done):
                    return False
        running = instance.get_run_records(
            dg.RunsFilter(
                statuses=[
                    dg.DagsterRunStatus.STARTED,
                    dg.DagsterRunStatus.QUEUED,
                    dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.NOT_STARTED,
                ]
            )
        )
        return not running


def failed_runs() -> list[str]:
    """Runs that failed, with their first error: a picture taken now would show a red asset."""
    import dagster as dg

    out = []
    with dg.DagsterInstance.get() as instance:
        failed = dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE])
        for record in instance.get_run_records(failed):
            run = record.dagster_run
            errors = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
            message = ""
            if errors and errors[0].dagster_event is not None:
                message = str(errors[0].dagster_event.message or "")[:300]
            partition = run.tags.get("dagster/partition", "-")
            out.append(f"run {run.run_id[:8]} ({run.job_name}, partition {partition}): {message}")
    return out


def cancel(day: str) -> str:
    """Run ``review_sentiment_cancel`` for ``day`` on the instance, as the launchpad does;
    its run id. Fails unless it cancelled batches (a picture of nothing cancelled is useless)."""
    import dagster as dg

    from example_project import definitions as ex

    job = ex.defs.resolve_job_def("review_sentiment_cancel")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(partition_key=day, instance=instance, run_config=QUIET)
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
    if not result.success or not any(": cancelled batch " in m for m in logged):
        raise RuntimeError(f"the cancel of {day} cancelled nothing: {logged[-5:]}")
    log(f"cancelled review_sentiment {day} (run {result.run_id[:8]})")
    return result.run_id


def collected_cancelled(day: str) -> bool:
    """The cancelled day of review_sentiment is collected: its failed rows are written."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        done = instance.get_materialized_partitions(dg.AssetKey("review_sentiment_failed"))
    return day in done


def progress_observations(day: str) -> list[dict[str, Any]]:
    """The progress metadata the sensor observed on ``review_sentiment_batches`` for ``day``."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_observations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("review_sentiment_batches"), asset_partitions=[day]
            ),
            limit=20,
        ).records
    out = []
    for record in records:
        observation = record.asset_observation
        if observation is not None:
            out.append({k: v.value for k, v in observation.metadata.items()})
    return out


def _advanced(observations: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Several observations, the latest far enough along to read as progress in a picture."""
    if len(observations) >= 3 and observations[0].get("progress_percent", 0) >= MIN_PERCENT:
        return observations
    return None


# --- dagster dev -----------------------------------------------------------------------------


@contextlib.contextmanager
def dagster_dev(env: dict[str, str], logfile: Path) -> Iterator[str]:
    """``dagster dev`` on the example project; yields its URL; stops its process group."""
    port = free_port()
    dagster = Path(sys.executable).parent / "dagster"
    command = [str(dagster) if dagster.exists() else "dagster", "dev"]
    command += ["-m", "example_project.definitions", "-h", "127.0.0.1", "-p", str(port)]
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: webserver, daemon, code servers
        )
    url = f"http://127.0.0.1:{port}"
    log(f"dagster dev (pid {proc.pid}) on {url}; its log: {logfile}")
    try:
        wait_for("the Dagster webserver", lambda: _answers(url, proc, logfile), timeout=180)
        yield url
    except Exception:
        tail = logfile.read_text(errors="replace")[-4000:]
        log(f"the end of dagster dev's log:\n{tail}")
        raise
    finally:
        stop_group(proc)


def _answers(url: str, proc: subprocess.Popen[bytes], logfile: Path) -> bool:
    if proc.poll() is not None:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"dagster dev exited with {proc.returncode}:\n{tail}")
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group (dagster dev shuts its children down), SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                log(f"dagster dev (pid {proc.pid}) stopped")
                return
            time.sleep(0.2)
    log(f"warning: process group {proc.pid} may still have members")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- main ------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the script as Ctrl-C does: through every ``finally``, so nothing is left."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--out", type=Path, default=IMAGES)
    parser.add_argument("--hold", action="store_true", help="keep the UI up until Ctrl-C")
    parser.add_argument(
        "--url", help="only take the pictures, of a UI already prepared (one left by --hold)"
    )
    args = parser.parse_args(argv)
    if not Path(args.chromium).exists():
        print(f"{args.chromium} not found: apt-get install -y chromium (or --chromium PATH)")
        return 2
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        print("playwright is missing: .venv/bin/python -m pip install playwright")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    warnings.filterwarnings("ignore", message=".*(preview|beta)")  # the checks' partitions_def
    if args.url:
        take_pictures(args.url.rstrip("/"), args.chromium, args.out)
        return 0
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    tmp = Path(tempfile.mkdtemp(prefix="infron-screenshots-"))
    try:
        env = prepare_environment(tmp)
        for day in COLLECTED_DAYS:
            set_local_server(FAST, FAILURE_RATES.get(day, FAILURE_RATE))
            submit(day)
        with dagster_dev(env, tmp / "dagster-dev.log") as url:
            wait_for(
                "the sensors to collect " + ", ".join(COLLECTED_DAYS),
                lambda: collected(COLLECTED_DAYS),
                timeout=300,
                every=2,
            )
            log("collected: results, failed rows and checks")
            for day in COLLECTED_DAYS:
                materialize_topics(day)
            set_local_server(SLOW, FAILURE_RATE)
            submit(IN_FLIGHT_DAY)
            submit(CANCELLED_DAY)
            observed = wait_for(
                f"progress observations of {IN_FLIGHT_DAY} past {MIN_PERCENT} %",
                lambda: _advanced(progress_observations(IN_FLIGHT_DAY)),
                timeout=SLOW["in_progress_seconds"] / 2,
                every=2,
            )
            log(f"in flight, {len(observed)} observations: {observed[0]['progress']}")
            cancel(CANCELLED_DAY)
            wait_for(
                f"the sensor to collect the cancelled {CANCELLED_DAY}",
                lambda: collected_cancelled(CANCELLED_DAY),
                timeout=120,
                every=2,
            )
            failures = failed_runs()
            if failures:  # the UI would show them (a red asset): no pictures of a broken state
                raise RuntimeError("runs failed; run again:\n" + "\n".join(failures))
            take_pictures(url, args.chromium, args.out)
            if args.hold:
                log(f"holding: the UI is at {url}; Ctrl-C to stop")
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
