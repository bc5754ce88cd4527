"""The batch-job runner of infer and evaluate (m3ddm_jax.jobs) on toy items: split by process, status files,
resume, claims, early checks, the tally and the exit code. Real processes: test_infer.py."""

import json
import os

import numpy as np
import pytest

from m3ddm_jax import fileio, jobs


class Job:
    """Items whose work writes <name>.out (or fails for the names in `bad`), recording which it did."""

    def __init__(self, folder, bad=()):
        self.folder, self.bad, self.done = folder, set(bad), []

    def status(self, name):
        return self.folder / "status" / f"{name}.json"

    def finished(self, name):
        return (self.folder / f"{name}.out").is_file()

    def work(self, name, state, bar):
        assert state == "model"
        self.done.append(name)
        if name in self.bad:
            raise ValueError(f"{name} is bad")
        fileio.write_text(str(self.folder / f"{name}.out"), name)
        return {"size": len(name)}

    def run(self, names, **kw):
        return jobs.run(names, self.work, status_path=self.status, finished=self.finished,
                        record=lambda name: {"item": name}, setup=lambda: "model", **kw)


NAMES = ["a", "b", "c", "d", "e"]


def test_split_by_process(tmp_path, monkeypatch):
    """Item i goes to process i mod P; the gathered outcomes cover every item once."""
    gathered = {}

    def allgather(outcome):
        gathered[jobs.jax.process_index()] = outcome
        return np.stack([outcome])

    monkeypatch.setattr(jobs.jax, "process_count", lambda: 2)
    monkeypatch.setattr(jobs.multihost_utils, "process_allgather", allgather)
    job = Job(tmp_path)
    for index in (1, 0):
        monkeypatch.setattr(jobs.jax, "process_index", lambda: index)
        job.run(NAMES)
    assert job.done == ["b", "d", "a", "c", "e"]
    assert gathered[1].tolist() == [0, jobs.DONE, 0, jobs.DONE, 0]
    assert gathered[0].tolist() == [jobs.DONE, 0, jobs.DONE, 0, jobs.DONE]
    assert [json.loads(job.status(n).read_text())["process"] for n in NAMES] == [0, 1, 0, 1, 0]


def test_status_files_resume_and_exit_code(tmp_path):
    job = Job(tmp_path, bad={"c"})
    outcome = job.run(NAMES)
    assert outcome.tolist() == [jobs.DONE, jobs.DONE, jobs.FAILED, jobs.DONE, jobs.DONE]
    ok, bad = jobs.read_status(job.status("a")), jobs.read_status(job.status("c"))
    assert ok["status"] == "ok" and ok["item"] == "a" and ok["size"] == 1 and ok["process"] == 0
    assert bad["status"] == "error" and bad["error"] == "c is bad" and bad["error_type"] == "ValueError"
    assert {"seconds", "host", "finished"} <= set(ok) & set(bad)
    tally = jobs.tally(NAMES, outcome, job.status)
    assert list(tally["done"]) == ["a", "b", "d", "e"] and list(tally["failed"]) == ["c"]
    assert tally["failed"]["c"]["error"] == "c is bad" and tally["skipped"] == tally["in_progress"] == []
    assert jobs.exit_code(tally["failed"]) == jobs.EXIT_ITEMS_FAILED == 2
    assert list((tmp_path / "status").glob("*.lock")) == []  # claims are released

    # Resume: done items are skipped (their status untouched), the failed one is retried and now succeeds.
    stamp = job.status("a").stat().st_mtime_ns
    job.done, job.bad = [], set()
    outcome = job.run(NAMES)
    assert job.done == ["c"] and job.status("a").stat().st_mtime_ns == stamp
    tally = jobs.tally(NAMES, outcome, job.status)
    assert tally["skipped"] == ["a", "b", "d", "e"] and list(tally["done"]) == ["c"] and tally["failed"] == {}
    assert jobs.exit_code(tally["failed"]) == jobs.EXIT_OK == 0

    # Nothing pending: setup (the model load) is not called.
    assert Job(tmp_path).run(NAMES, check=None).tolist() == [jobs.SKIPPED] * 5
    assert jobs.run(NAMES, job.work, status_path=job.status, finished=job.finished,
                    setup=lambda: pytest.fail("loaded a model with nothing to do")).tolist() == [jobs.SKIPPED] * 5


def test_claimed_items_and_early_checks(tmp_path):
    """An item another live run holds is left to it (in progress, then as its status file says); a failing
    check fails its item before setup and work."""
    job = Job(tmp_path)
    os.makedirs(tmp_path / "status")
    checked = []

    def check(name):
        checked.append(name)
        if name == "e":
            raise IsADirectoryError(f"output of {name} is a folder")

    with fileio.claim(str(jobs.lock_path(job.status("b")))) as held:  # another run, alive (this process)
        assert held
        outcome = job.run(NAMES, check=check)
        assert checked == NAMES and job.done == ["a", "c", "d"]
        assert outcome.tolist() == [jobs.DONE, jobs.CLAIMED, jobs.DONE, jobs.DONE, jobs.FAILED]
        tally = jobs.tally(NAMES, outcome, job.status)
        assert tally["in_progress"] == ["b"] and tally["failed"]["e"]["error"] == "output of e is a folder"
        assert tally["failed"]["e"]["error_type"] == "IsADirectoryError"
        jobs.attempt("b", lambda: {"size": 1}, job.status("b"), {})  # the other run finishes b
    tally = jobs.tally(NAMES, outcome, job.status)
    assert tally["in_progress"] == [] and list(tally["done"]) == ["a", "b", "c", "d"]


def test_setup_errors_give_exit_1(capsys):
    def job():
        raise FileNotFoundError("weights folder w does not exist")

    assert jobs.main(job) == (jobs.EXIT_SETUP_ERROR, None)
    assert "error: weights folder w does not exist" in capsys.readouterr().err
    assert jobs.main(lambda: {"failed": {}}) == (jobs.EXIT_OK, {"failed": {}})
