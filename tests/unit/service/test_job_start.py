"""Forked job processes skip the worker's `__main__`: multiprocessing would re-run it in every forkserver
child (the Celery CLI or Ray's default_worker.py, seconds each), while other processes keep the stock
behaviour."""

from __future__ import annotations

import sys
import types
from multiprocessing import spawn

from workers import job_start


def test_job_processes_do_not_re_run_the_parents_main_module(monkeypatch):
    fake_main = types.ModuleType("__main__")
    fake_main.__spec__ = types.SimpleNamespace(name="api.cli")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    assert spawn.get_preparation_data is job_start._preparation_data
    other = spawn.get_preparation_data("some-other-process")
    job = spawn.get_preparation_data(f"{job_start.JOB_PROCESS_PREFIX}01ABC")
    assert other["init_main_from_name"] == "api.cli"
    assert "init_main_from_name" not in job and "init_main_from_path" not in job
    assert job["sys_path"] == other["sys_path"]  # everything else is what the stock data holds
