"""Chaos, short: a batch chunk of 150 text items driven over gRPC as Propeller drives it, with one
fault injected mid-batch (bench/chaos.py runs all five on 1,000 items). Each run has its own
redis-server (AOF, restarted for real), control plane and connector; every item must end exactly
once, and nothing of the stack (process, `/dev/shm` arena) may be left once it is stopped."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

from chaos import run_fault  # noqa: E402

ITEMS = 150


@pytest.mark.parametrize("fault", ["executor", "redis", "connector"])
def test_a_fault_mid_batch_loses_duplicates_and_orphans_nothing(fault: str, tmp_path: pathlib.Path) -> None:
    outcome = run_fault(fault, ITEMS, tmp_path / fault)
    assert outcome.mid_batch, f"the fault came after {outcome.ended_at_fault} of {ITEMS} items: not mid-batch"
    assert outcome.phase == "SUCCEEDED", outcome.notes
    assert (outcome.lost, outcome.duplicates) == (0, 0), outcome
    assert (outcome.orphans, outcome.shm_left) == (0, 0), outcome.notes
    assert outcome.done + outcome.errors == ITEMS
    assert outcome.recovery_s is not None, "no item ended after the fault"
