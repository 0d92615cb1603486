"""Chaos, retries spent: the branch of "every item ends DONE exactly once, or, when its retries are
spent, ERROR with a recoverable message" that one fault per run never reaches.

A batch chunk of 150 text items is driven over gRPC as Propeller drives it (bench/chaos.py, fault
`retries-spent`) with the unit task's `options.retries` at 1: the encoder's executor is SIGKILLed
while it runs a batch invocation, then each executor (a replacement) that runs items of a killed
invocation again, until items were hit on their last attempt. A batch invocation is submitted with
max_attempts 1, so the executor that takes over a dead one's invocation fails it, recoverably; the
batch runner retries the items (once) and then ends them.

The results file does not carry an error's kind: it is read from the records of the invocations the
kills hit (still in Redis when the batch ends), and each ERROR row must carry the error of the
invocation that hit its item last.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

from chaos import run_fault  # noqa: E402

ITEMS = 150
ITEM_RETRIES = 1  # two kills spend them (the fifth exit within 5 minutes would fail the deployment)


def test_items_hit_on_their_last_attempt_end_once_in_a_recoverable_error(tmp_path: pathlib.Path) -> None:
    outcome = run_fault("retries-spent", ITEMS, tmp_path / "retries-spent", item_retries=ITEM_RETRIES)
    assert not [note for note in outcome.notes if "fault" in note], outcome.notes
    assert outcome.mid_batch, "no kill hit a running invocation of the batch"
    assert outcome.phase == "SUCCEEDED", outcome.notes  # min_success_ratio 0: errors do not fail the chunk
    assert outcome.spent_ids, f"no item spent its retries: {outcome.notes}"

    # every item ended exactly once
    assert (outcome.lost, outcome.duplicates) == (0, 0), outcome
    assert outcome.done + outcome.errors == ITEMS, outcome

    # ERROR: exactly the items a kill hit on their last attempt, each with its retries spent and the
    # recoverable error of the invocation that hit it last, which says its executor died
    assert sorted(outcome.error_rows) == outcome.spent_ids, outcome.notes
    assert outcome.misfiled == 0
    assert outcome.unexplained == 0, outcome.notes
    assert set(outcome.error_kinds) == {"ERROR/recoverable"}, outcome.error_kinds
    for item, error in outcome.error_rows.items():
        assert "executor died while running it" in error and "no attempt left" in error, (item, error)

    # every other item (hit on an earlier attempt, or never) DONE, with an embedding of its own
    assert outcome.done == ITEMS - len(outcome.spent_ids)
    assert outcome.bad_outputs == 0

    # nothing of the stack left
    assert (outcome.orphans, outcome.shm_left) == (0, 0), outcome.notes
