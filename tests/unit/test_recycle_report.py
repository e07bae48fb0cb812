"""The server's check of a supervisor's recycle report (`kernels/docker/recycling.py`): only the one
shape of a clean report recycles a container; a well-formed report of findings refuses it as
leftovers; anything else is a failure (and removes the container too)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_env.kernels.base import REFUSALS
from sandbox_env.kernels.docker.recycling import report_refusal, unfit

CLEAN = {"op": "result", "id": 3, "clean": True, "findings": []}


def test_only_a_clean_report_recycles() -> None:
    assert report_refusal(dict(CLEAN)) is None


def test_a_report_of_findings_is_leftovers() -> None:
    assert report_refusal({**CLEAN, "clean": False, "findings": ["process", "file:/tmp"]}) == "leftovers"


@pytest.mark.parametrize("report", [
    {**CLEAN, "clean": 1},  # not a bool
    {**CLEAN, "clean": "true"},
    {**CLEAN, "findings": ["process"]},  # clean, yet with findings
    {**CLEAN, "clean": False},  # not clean, yet no finding
    {**CLEAN, "clean": False, "findings": ["file:/etc"]},  # not a word the supervisor uses
    {**CLEAN, "clean": False, "findings": "process"},
    {**CLEAN, "status": "ok"},  # a step's result, not a report
    {**CLEAN, "op": "anomaly"},
    {k: v for k, v in CLEAN.items() if k != "findings"},
])
def test_anything_else_is_a_failure(report: dict[str, Any]) -> None:
    assert report_refusal(report) == "failed"


def test_what_forbids_even_asking() -> None:
    fit = {"closed": False, "reuses": 0, "allowed": 1, "busy": False, "tainted": False}
    assert unfit(**fit) is None
    assert unfit(**{**fit, "allowed": 0}) == "budget"
    assert unfit(**{**fit, "reuses": 1}) == "budget"
    assert unfit(**{**fit, "busy": True}) == "busy"
    assert unfit(**{**fit, "tainted": True}) == "tainted"
    assert unfit(**{**fit, "closed": True, "tainted": True}) == "closed"
    assert {"budget", "busy", "tainted", "closed", "leftovers", "failed"} <= set(REFUSALS)
