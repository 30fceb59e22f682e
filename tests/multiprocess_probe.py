"""``combinekd train`` for tests/test_multiprocess.py, run under torchrun: each process also writes what it
trained on, update by update, and the state of its random generator at the first update, to
``$COMBINEKD_TEST_TRACE.RANK.json``; and how many DDP wrappers were alive when the process group was
destroyed, to ``$COMBINEKD_TEST_TRACE.RANK.teardown.json``."""

from __future__ import annotations

import gc
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


def record_teardown(teardown: dict) -> None:
    """Wrap ``Accelerator.end_training`` (which destroys the process group) to count the DDP wrappers still
    alive then: one left behind frees the process group from its reducer later, with the GIL held (gloo's
    destructor then waits for worker threads that may need the GIL: a hang)."""
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    original = Accelerator.end_training

    def end_training(self):
        gc.collect()
        teardown["ddp_alive"] = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        return original(self)

    Accelerator.end_training = end_training


if __name__ == "__main__":
    updates: list = []
    teardown: dict = {}
    record_updates(updates)
    record_teardown(teardown)
    code = main(sys.argv[1:])
    trace = f"{os.environ['COMBINEKD_TEST_TRACE']}.{os.environ['RANK']}"
    with open(f"{trace}.json", "w", encoding="utf-8") as file:
        json.dump(updates, file)
    with open(f"{trace}.teardown.json", "w", encoding="utf-8") as file:
        json.dump(teardown, file)
    sys.exit(code)
