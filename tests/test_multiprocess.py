"""Several processes: ``torchrun --nproc-per-node 2`` on CPU (gloo) with a tiny model on a tiny corpus.

One process with ``grad_accum`` 2 and two processes with ``grad_accum`` 1 train on the same batches to
the same weights; an error on one process ends them all; resume is exact with two processes too."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import combinekd
from combinekd import trainer
from combinekd.config import dump_config
from combinekd.data import Split, load_split, token_batches
from combinekd.trainer import BatchStream, train

from conftest import prepare_corpus, tiny_config, write_corpus
from multiprocess_probe import record_updates

SRC = Path(combinekd.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 300  # seconds; a run takes about 15 s on 2 busy cores, a hung one would wait forever
TOLERANCE = 1e-5  # 1 process vs 2: the same sums in another order (float32)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    return prepare_corpus(write_corpus(root / "corpus", {"train": 200, "dev": 8, "test": 8}), root / "data")


def small_config(data: Path, out: Path, **sets):
    return tiny_config(data, out, **{"train.eval_max_sentences": 2, "train.log_every": 1, **sets})


def start(cfg, *args: str, env: dict | None = None, script: str = "-m combinekd") -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 SCRIPT train CONFIG ARGS``."""
    config = Path(cfg.output_dir).with_suffix(".yaml")
    config.write_text(dump_config(cfg), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *script.split(),
               "train", str(config), *args]
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1",
           "COMBINEKD_TEST_LAUNCH": tag, **(env or {})}
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run.tag = tag
    return run


def launched(run: subprocess.Popen) -> list[int]:
    """The live processes of a run: torchrun and its workers (which it starts in sessions of their own,
    so they are found by an environment variable of the run, not by process group)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"COMBINEKD_TEST_LAUNCH={run.tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # ended meanwhile
            pass
    return pids


def kill(run: subprocess.Popen) -> None:
    for pid in launched(run):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(run: subprocess.Popen) -> tuple[int, str]:
    """The run's exit code and output once every process it started has ended; the test fails if one is
    left running, or if the run outlives LAUNCH_TIMEOUT."""
    try:
        output, _ = run.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill(run)
        run.communicate()
        pytest.fail(f"the 2-process run did not end within {LAUNCH_TIMEOUT} s (a hang)")
    if left := launched(run):
        kill(run)
        pytest.fail(f"processes {left} of the 2-process run were left running:\n{output[-3000:]}")
    return run.returncode, output


def torchrun(cfg, *args: str, **kwargs) -> tuple[int, str]:
    return finish(start(cfg, *args, **kwargs))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints/last/objective.safetensors"))


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- batches (no processes)
@pytest.mark.parametrize("world, grad_accum", [(2, 1), (4, 1), (2, 3)])
def test_processes_split_one_batch_sequence(world, grad_accum):
    """Update u of W processes x G micro-batches trains on the same batches as one process with grad_accum
    W * G, across epochs too, with 7 batches an epoch (neither a multiple of 2 nor of 4)."""
    split = Split(src=[[i, 6, 0] for i in range(10, 17)], tgt=[[7, 8, 0]] * 7)  # one pair a batch (max_tokens 5)
    one = BatchStream(split, 5, pad_id=1, seed=1)
    ranks = [BatchStream(split, 5, pad_id=1, seed=1, rank=r, world=world) for r in range(world)]
    assert len(one._epoch_batches()) == 7
    for update in range(10):
        expected = [next(one)["input_ids"].tolist() for _ in range(world * grad_accum)]
        drawn = {r: [next(stream)["input_ids"].tolist() for _ in range(grad_accum)] for r, stream in enumerate(ranks)}
        assert sorted(b for batches in drawn.values() for b in batches) == sorted(expected), update
        assert {(s.epoch, s.batch) for s in ranks} == {(one.epoch, one.batch)}, "one position for every process"


def test_an_epoch_with_fewer_batches_than_processes():
    split = Split(src=[[5, 6, 0]] * 3 + [[5, 0]] * 3, tgt=[[7, 0]] * 6)
    streams = [BatchStream(split, 1000, pad_id=1, seed=1, rank=r, world=4) for r in range(4)]  # 1 batch an epoch
    for update in range(3):
        assert [next(s)["input_ids"].shape[0] for s in streams] == [6] * 4
        assert {(s.epoch, s.batch) for s in streams} == {(4 * (update + 1), 0)}, "epoch r goes to process r"


def test_a_stream_position_from_before_the_shared_sequence_still_loads():
    split = Split(src=[[5, 0]] * 8, tgt=[[6, 0]] * 8)  # 8 batches of one pair
    stream = BatchStream(split, 2, pad_id=1, seed=1, rank=1, world=2)
    stream.load_state_dict({"epoch": 0, "position": 3})  # this process had taken 3 batches of epoch 0
    assert stream.state_dict() == {"epoch": 0, "batch": 6}


# ----------------------------------------------------------------------------- 2 processes
def test_two_processes_train_like_one_with_twice_the_accumulation(small_data, tmp_path, monkeypatch):
    """Same global batches, same seed, dropout 0: 2 processes x grad_accum 1 = 1 process x grad_accum 2,
    update by update (loss, gradient norm) and in the final weights, within TOLERANCE."""
    sets = {"model.dropout": 0.0, "train.max_steps": 4, "train.eval_every": 4}
    two = tmp_path / "two"
    code, output = torchrun(small_config(small_data, two, **sets), script=str(TESTS / "multiprocess_probe.py"),
                            env={"COMBINEKD_TEST_TRACE": str(tmp_path / "trace")})
    assert code == 0, output[-3000:]
    assert output.count('"steps": 4') == 1, "one summary, from process 0"
    ranks = [json.loads((tmp_path / f"trace.{rank}.json").read_text()) for rank in (0, 1)]
    # the DDP wrapper (its reducer) is gone before the process group is destroyed: freed after it, it
    # destroyed the group with the GIL held and hung about one run in five
    assert [json.loads((tmp_path / f"trace.{rank}.teardown.json").read_text()) for rank in (0, 1)] == \
        [{"ddp_alive": 0}] * 2

    single: list = []
    monkeypatch.setattr(trainer, "accumulate_gradients", trainer.accumulate_gradients)  # restored after the test
    record_updates(single)
    one = tmp_path / "one"
    train(small_config(small_data, one, **sets, **{"train.grad_accum": 2}))

    # the same batches: process r takes micro-batch r of the single process's update
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for update, (a, b, s) in enumerate(zip(*ranks, single)):
        assert a["batches"] + b["batches"] == s["batches"], update
    # ... with different dropout: the processes' generators differ from the first update on
    assert ranks[0][0]["rng"] != ranks[1][0]["rng"]

    log_one, log_two = [e for e in log(one) if "loss" in e], [e for e in log(two) if "loss" in e]
    assert [e["step"] for e in log_one] == [e["step"] for e in log_two] == [1, 2, 3, 4]
    for a, b in zip(log_one, log_two):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), (key, a, b)
    w_one, w_two = weights(one), weights(two)
    assert max(float((w_one[k] - w_two[k]).abs().max()) for k in w_one) <= TOLERANCE


def test_an_error_on_one_process_ends_every_process(small_data, tmp_path):
    """Process 1 fails after update 3 (a test hook): it says why in one line and exits with code 2; the
    other process ends too (no hang) and the checkpoint of update 2 is intact."""
    failing = small_config(small_data, tmp_path / "failing", **{"train.max_steps": 4, "train.eval_every": 2})
    code, output = torchrun(failing, env={"COMBINEKD_TEST_FAIL": "1:3"})
    assert code == 1, output[-3000:]  # torchrun's own code for "a process failed"; it names process 1's:
    assert re.search(r"rank +: 1 .*\n +exitcode +: 2 ", output), output[-3000:]
    # process 1's line; process 0 says why it stops too, unless torchrun's SIGTERM ends it first
    assert "combinekd: error (process 1 of 2): test failure on process 1 after update 3\n" in output
    errors = re.findall(r"combinekd: error.*", output)
    assert set(errors) <= {"combinekd: error (process 1 of 2): test failure on process 1 after update 3",
                           "combinekd: error (process 0 of 2): another process of this run stopped: see its error"}
    assert not [line for line in output.splitlines() if line.startswith("[rank") and "Traceback" in line], output
    assert json.loads((tmp_path / "failing/checkpoints/last/trainer_state.json").read_text())["progress"]["step"] == 2


def test_the_launcher_reports_the_process_whose_own_error_stopped_the_run():
    from types import SimpleNamespace as Failure

    from combinekd.cli import root_cause
    from combinekd.errors import PeerStopped

    PEER_STOPPED = PeerStopped.exit_code

    # noticed in the same poll (same timestamp): process 0 stopped because of process 1, or aborted at exit
    for consequence in (PEER_STOPPED, -6):
        failures = {0: Failure(exitcode=consequence, timestamp=100), 1: Failure(exitcode=2, timestamp=100)}
        assert root_cause(failures)[0] == 1
    # without a user error: a crash (a traceback's exit 1) before a process that stopped because of it
    assert root_cause({0: Failure(exitcode=PEER_STOPPED, timestamp=99), 1: Failure(exitcode=1, timestamp=100)})[0] == 1
    assert root_cause({0: Failure(exitcode=2, timestamp=101), 1: Failure(exitcode=2, timestamp=100)})[0] == 1


def test_two_processes_resume_exactly_after_a_kill(small_data, tmp_path):
    """Killed (SIGKILL) while writing the checkpoint of update 4, whose weights are staged by then, and
    resumed from that of update 2: the weights equal the staged ones bit for bit (dropout on: each process's
    generator is restored). One batch is a whole epoch here, fewer batches than processes."""
    out = tmp_path / "run"
    cfg = small_config(small_data, out, **{"train.max_steps": 4, "train.eval_every": 2, "train.max_tokens": 20000})
    train_split = load_split(small_data, "train", cfg.model.max_length)
    assert len(token_batches([len(s) for s in train_split.src], [len(t) for t in train_split.tgt], 20000)) == 1
    run = start(cfg, env={"COMBINEKD_TEST_PAUSE_CHECKPOINT": "4"})
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (paused := list((out / "checkpoints").glob(".last.tmp-*/PAUSED"))):
        assert run.poll() is None and time.monotonic() < deadline, "the run did not pause in its checkpoint"
        time.sleep(0.2)
    uninterrupted = load_file(str(paused[0].parent / "objective.safetensors"))  # after update 4
    kill(run)  # torchrun and both processes, as a crash of the machine would
    finish(run)
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["progress"]["step"] == 2

    code, output = torchrun(cfg, "--resume")
    assert code == 0, output[-3000:]
    resumed = weights(out)
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in resumed)
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    assert state["processes"] == 2 and state["stream"] == {"epoch": 8, "batch": 0}
    rng = [load_file(str(out / f"checkpoints/last/rng.{rank}.safetensors")) for rank in (0, 1)]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_train_processes_launches_and_reports_a_failure_in_one_line(small_data, tmp_path):
    """``combinekd train --processes 2`` starts the processes itself: a failure of one ends the command
    with exit code 2 and one line (no launcher traceback); resumed without the failure it finishes, and
    the summary is printed once."""
    out = tmp_path / "run"
    cfg = small_config(small_data, out, **{"train.max_steps": 4, "train.eval_every": 2})
    config = out.with_suffix(".yaml")
    config.write_text(dump_config(cfg), encoding="utf-8")

    def launch(*args: str, env: dict | None = None) -> tuple[int, str]:
        tag = uuid.uuid4().hex
        run = subprocess.Popen([sys.executable, "-m", "combinekd", "train", str(config), "--processes", "2", *args],
                               env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
                                    "COMBINEKD_TEST_LAUNCH": tag, **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run.tag = tag
        return finish(run)

    code, output = launch(env={"COMBINEKD_TEST_FAIL": "1:3"})
    assert code == 2, output[-3000:]
    assert "combinekd: error (process 1 of 2): test failure on process 1 after update 3\n" in output
    assert re.search(r"combinekd: error: process 1 of 2 failed \(exit code 2\): its error is above\n$", output), \
        output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    code, output = launch("--resume")
    assert code == 0, output[-3000:]
    summaries = [line for line in output.splitlines() if line.startswith('{"steps"')]
    assert len(summaries) == 1 and json.loads(summaries[0])["steps"] == 4, output[-3000:]
