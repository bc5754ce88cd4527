"""The batch-job runner of infer and evaluate: a sorted list of named items (videos), each done at most once
over the processes of a run and over runs sharing an output folder.

* Split: item i goes to process i mod P (jax.process_index / process_count), so every host has its share.
* Resume: an item `finished` says is done (its outputs exist) is skipped.
* Claim: before its work an item is claimed with a lock file beside its status file (fileio.claim), so runs
  started separately on one output folder split the items; a claimed item is left to its holder, and a lock
  whose process died is taken over.
* Status: every attempt writes the item's status file atomically: 'ok' with the work's fields, or 'error' with
  the reason, and the seconds, process, host and time. One failing item is logged and recorded; the batch goes
  on, and the next run retries it.
* Barrier: the processes gather every item's outcome in this run (DONE, SKIPPED, FAILED, CLAIMED), which also
  waits until every host has written its status files.
* Summary and exit code: `tally` sorts the items by outcome and status file; `exit_code` is EXIT_ITEMS_FAILED
  when an item failed.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from m3ddm_jax import fileio

log = logging.getLogger(__name__)

EXIT_OK, EXIT_SETUP_ERROR, EXIT_ITEMS_FAILED = 0, 1, 2
# An item's outcome in this run, as gathered from the hosts (0: nobody's; CLAIMED: another run on the same
# output folder held it at its turn, or finished it since this run listed the items: its status file says how).
DONE, SKIPPED, FAILED, CLAIMED = 1, 2, 3, 4

StatusPath = Callable[[str], pathlib.Path]


def lock_path(status: pathlib.Path) -> pathlib.Path:
    return status.with_suffix(".lock")


def read_status(path: pathlib.Path) -> dict:
    """An item's status record; {} when there is none (or it cannot be read)."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return {}


def attempt(name: str, work: Callable[[], dict], status: pathlib.Path, record: dict,
            error: Exception | None = None, *, unit: str = "item") -> bool:
    """Runs one item's `work` (or fails it with `error`, found before it started), whatever happens to it, and
    writes its status file: `record` plus status 'ok' and the work's fields, or 'error' and the reason. True
    if it is done."""
    t0 = time.perf_counter()
    record = dict(record)
    try:
        if error is not None:
            raise error
        record.update(status="ok", **work())
        log.info("%s %s done", unit, name)
    except Exception as err:  # one bad item must not stop the batch; it is recorded and retried next run
        expected = isinstance(err, (OSError, ValueError))  # bad input: the message says it all
        log.error("%s %s failed, skipped: %s", unit, name, err, exc_info=not expected)
        record.update(status="error", error=str(err), error_type=type(err).__name__)
    record.update(seconds=time.perf_counter() - t0, process=jax.process_index(), host=socket.gethostname(),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    fileio.write_text(str(status), json.dumps(record, indent=2))
    return record["status"] == "ok"


def run(names: Sequence[str], work: Callable[[str, Any, tqdm], dict], *, status_path: StatusPath,
        finished: Callable[[str], bool], record: Callable[[str], dict] = lambda name: {},
        check: Callable[[str], None] | None = None, setup: Callable[[], Any] | None = None,
        desc: str = "items", unit: str = "item", verb: str = "do") -> np.ndarray:
    """Runs (or resumes) this process's share of `names`; returns every item's outcome in this run, gathered
    from all processes.

    work(name, state, bar) does one item and returns its status fields ('ok'); it raises on failure.
    check(name), called on each pending item before any work, fails an item early by raising (a bad output
    path: no need to load a model to find it). setup() makes `state` (the model), once, and only when some
    item is pending; its errors are the run's, not an item's.
    """
    index, count = jax.process_index(), jax.process_count()
    outcome = np.zeros(len(names), np.int32)
    mine = list(range(index, len(names), count))
    pending = [i for i in mine if not finished(names[i])]
    outcome[mine] = SKIPPED
    log.info("%d of %d %ss to %s on this host (%d already finished)", len(pending), len(mine), unit, verb,
             len(mine) - len(pending))
    for i in list(pending) if check else ():
        try:
            check(names[i])
        except OSError as err:
            attempt(names[i], dict, status_path(names[i]), record(names[i]), err, unit=unit)
            outcome[i] = FAILED
            pending.remove(i)
    if pending:
        state = setup() if setup else None
        if count > 1:
            desc = f"{desc} (process {index}/{count})"
        with tqdm(total=len(mine), initial=len(mine) - len(pending), desc=desc, unit=unit, file=sys.stderr) as bar:
            for i in pending:
                bar.set_postfix_str(names[i])
                outcome[i] = _claim_and_attempt(names[i], lambda: work(names[i], state, bar), status_path,
                                                finished, record, unit)
                bar.update()
    if count > 1:  # also the barrier: every host has written its status files
        outcome = multihost_utils.process_allgather(outcome).max(axis=0)
    return outcome


def _claim_and_attempt(name: str, work: Callable[[], dict], status_path: StatusPath,
                       finished: Callable[[str], bool], record: Callable[[str], dict], unit: str) -> int:
    """One item, if this run can claim it: another run on the same output folder may hold it, or have
    finished it since this run listed the items."""
    status = status_path(name)
    os.makedirs(status.parent, exist_ok=True)
    with fileio.claim(str(lock_path(status))) as held:
        if not held:
            log.info("%s %s is being done by another run, left to it", unit, name)
            return CLAIMED
        if finished(name):
            return CLAIMED
        return DONE if attempt(name, work, status, record(name), unit=unit) else FAILED


def tally(names: Sequence[str], outcome: np.ndarray, status_path: StatusPath) -> dict:
    """The run's items by outcome, read from the status files, so that an item another run on the same output
    folder did counts as that run recorded it: `done` and `failed` ({name: status record}), `skipped` (already
    finished before this run) and `in_progress` (held by another run that has not recorded it yet)."""
    records = {name: read_status(status_path(name)) for name in names}
    claimed = {name: records[name].get("status") for name, o in zip(names, outcome) if o == CLAIMED}
    return {"done": {name: records[name] for name, o in zip(names, outcome)
                     if o == DONE or claimed.get(name) == "ok"},
            "failed": {name: records[name] for name, o in zip(names, outcome)
                       if o == FAILED or claimed.get(name) == "error"},
            "skipped": [name for name, o in zip(names, outcome) if o == SKIPPED],
            "in_progress": sorted(name for name, s in claimed.items() if s not in ("ok", "error"))}


def exit_code(failed) -> int:
    return EXIT_ITEMS_FAILED if failed else EXIT_OK


def main(job: Callable[[], Any]) -> tuple[int, Any]:
    """Runs an entry point's job: a setup error (bad config or input, OSError / ValueError) is printed and gives
    EXIT_SETUP_ERROR before any work; returns (exit status so far, the job's result)."""
    try:
        return EXIT_OK, job()
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_ERROR, None
