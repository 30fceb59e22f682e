"""``combinekd train`` for tests/test_multiprocess.py, run under torchrun: each process also writes what it
trained on, update by update, and the state of its random generator at the first update, to
``$COMBINEKD_TEST_TRACE.RANK.json``."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from combinekd import trainer
from combinekd.cli import main


def record_updates(trace: list) -> None:
    """Wrap ``trainer.accumulate_gradients`` so that every update appends its micro-batches' source ids and
    a fingerprint of torch's random generator (whose draws are the dropout masks) to ``trace``."""
    original = trainer.accumulate_gradients

    def accumulate_gradients(accelerator, model, micro_batches):
        trace.append({"batches": [batch["input_ids"].tolist() for batch in micro_batches],
                      "rng": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()})
        return original(accelerator, model, micro_batches)

    trainer.accumulate_gradients = accumulate_gradients


if __name__ == "__main__":
    updates: list = []
    record_updates(updates)
    code = main(sys.argv[1:])
    with open(f"{os.environ['COMBINEKD_TEST_TRACE']}.{os.environ['RANK']}.json", "w", encoding="utf-8") as file:
        json.dump(updates, file)
    sys.exit(code)
