"""Reliability: kills while writing a checkpoint, finished runs, one run per output dir, strict model
loading, non-finite losses, file permissions, several processes (more in test_multiprocess.py)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import combinekd
from combinekd.cli import main
from combinekd.config import ModelConfig, dump_config
from combinekd.data import Split, load_tokenizer
from combinekd.distill import Objective
from combinekd.errors import UserError
from combinekd.files import atomic_dir, atomic_file, recover
from combinekd.models import build_model, load_model_dir, save_model_dir
from combinekd.trainer import BatchStream, TrainerState, load_checkpoint, rng_state, save_checkpoint, train

from conftest import prepare_corpus, tiny_config, write_corpus
from test_distill import kd_config, teacher_dir  # noqa: F401  (teacher_dir is a fixture)

SRC = Path(combinekd.__file__).resolve().parents[1]
QUICK = {"train.eval_max_sentences": 4}  # dev BLEU on 4 sentences: these tests are about files, not scores


# ----------------------------------------------------------------------------- helpers
def write_config(cfg, path: Path) -> Path:
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


def start_train(cfg, tmp_path: Path, pause_at: int) -> subprocess.Popen:
    """``combinekd train`` in a subprocess that stops half-way through writing the checkpoint of update ``pause_at``."""
    config = write_config(cfg, tmp_path / f"{Path(cfg.output_dir).name}.yaml")
    # SRC first, then the caller's PYTHONPATH (e.g. another transformers), so both runs use the same libraries
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
           "COMBINEKD_TEST_PAUSE_CHECKPOINT": str(pause_at)}
    log = (tmp_path / f"{Path(cfg.output_dir).name}.stderr").open("w")
    return subprocess.Popen([sys.executable, "-m", "combinekd", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)


def wait_until_paused(run: subprocess.Popen, out: Path, timeout: float = 300) -> Path:
    """The staged (half-written) checkpoint dir once the run pauses in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if staged := list((out / "checkpoints").glob(".last.tmp-*/PAUSED")):
            return staged[0].parent
        if run.poll() is not None:
            pytest.fail(f"the run ended (exit {run.returncode}) before pausing in a checkpoint")
        time.sleep(0.2)
    run.kill()
    pytest.fail("the run did not reach the paused checkpoint in time")


def checkpoint_step(out: Path) -> int:
    return json.loads((out / "checkpoints/last/trainer_state.json").read_text())["progress"]["step"]


def checkpoint_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints/last/objective.safetensors"))


# ----------------------------------------------------------------------------- 1. SIGKILL mid-checkpoint
@pytest.mark.parametrize("kind", ["plain", "kd"])
def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(kind, data_dir, tmp_path, request):
    sets = {**QUICK, "train.max_steps": 6, "train.eval_every": 2}
    if kind == "kd":  # a student with trainable combiners on both sides (student width 64, teacher 96)
        teacher = request.getfixturevalue("teacher_dir")
        sets.update({"distill.decoder.strategy": "random", "distill.decoder.combiner": "linear"})

        def config(name):
            return kd_config(data_dir, tmp_path / name, teacher, **sets)
    else:
        def config(name):
            return tiny_config(data_dir, tmp_path / name, **sets)

    train(config("straight"))
    killed = tmp_path / "killed"
    run = start_train(config("killed"), tmp_path, pause_at=4)
    staged = wait_until_paused(run, killed)
    assert (staged / "objective.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    run.kill()  # SIGKILL: no cleanup of any kind
    run.wait()
    assert checkpoint_step(killed) == 2

    train(config("killed"), resume=True)
    straight, resumed = checkpoint_weights(tmp_path / "straight"), checkpoint_weights(killed)
    assert straight.keys() == resumed.keys()
    if kind == "kd":
        assert any(k.startswith("combiners.decoder") for k in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert checkpoint_step(killed) == 6
    assert not list((killed / "checkpoints").glob(".last.*")), "the killed run's staging dir is cleaned up"


# ----------------------------------------------------------------------------- 2. finished runs
@pytest.mark.parametrize("sets, message", [
    ({"train.max_steps": 2, "train.eval_every": 2}, "already finished"),
    ({"train.lr": 1e-12, "train.max_steps": 100, "train.eval_every": 2, "train.patience": 2}, "stopped early"),
])
def test_resuming_a_finished_or_early_stopped_run_does_nothing(data_dir, tmp_path, capsys, sets, message):
    cfg = tiny_config(data_dir, tmp_path / "run", **QUICK, **sets)
    first = train(cfg)
    out = tmp_path / "run"
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    assert state["progress"]["finished"] and state["progress"]["stopped_early"] == (message == "stopped early")
    before = {name: (out / name).read_bytes() for name in ("train_log.jsonl", "model.safetensors",
                                                          "checkpoints/last/trainer_state.json")}
    config = write_config(cfg, tmp_path / "run.yaml")
    capsys.readouterr()
    assert main(["train", str(config), "--resume"]) == 0
    captured = capsys.readouterr()
    assert message in captured.err and "nothing to resume" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["steps"] == first["steps"] and summary["stopped_early"] == first["stopped_early"]
    assert all((out / name).read_bytes() == content for name, content in before.items()), "nothing was trained"


# ----------------------------------------------------------------------------- 3. one run per output dir
def test_a_second_run_into_the_same_output_dir_is_refused(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path / "run", **QUICK, **{"train.max_steps": 4, "train.eval_every": 2})
    config = write_config(cfg, tmp_path / "second.yaml")
    run = start_train(cfg, tmp_path, pause_at=2)
    try:
        wait_until_paused(run, tmp_path / "run")
        for extra in ([], ["--resume"]):
            assert main(["train", str(config), *extra]) == 2
            err = capsys.readouterr().err
            assert "is in use by another `combinekd train`" in err and ".lock" in err
            assert len(err.strip().splitlines()) == 1
    finally:
        run.kill()
        run.wait()
    # the kernel dropped the killed run's lock; its half-written first checkpoint is cleaned up
    assert train(cfg)["steps"] == 4


# ----------------------------------------------------------------------------- 4. strict model loading
@pytest.fixture()
def model_dir(data_dir, tmp_path) -> Path:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data_dir)
    shape = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=32, ffn_dim=64, heads=4, max_length=64)
    save_model_dir(build_model(shape, tokenizer), tokenizer, tmp_path / "model")
    return tmp_path / "model"


def _edit_weights(path: Path, edit) -> None:
    weights = load_file(str(path / "model.safetensors"))
    edit(weights)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: _edit_weights(p, lambda w: w.pop("model.encoder.layers.1.fc1.weight")),
     r"model.safetensors does not match .*config.json: 1 missing weights: model.encoder.layers.1.fc1.weight"),
    (lambda p: _edit_weights(p, lambda w: w.update(stray=torch.zeros(3))),
     r"model.safetensors does not match .*config.json: 1 unexpected weights: stray"),
    (lambda p: _edit_config(p, encoder_layers=3),
     r"model.safetensors does not match .*config.json: \d+ missing weights: model.encoder.layers.2"),
    (lambda p: _edit_config(p, encoder_ffn_dim=128),
     r"model.safetensors does not match .*config.json: \d+ weights of another shape: model.encoder.layers.0.fc1"),
    (lambda p: (torch.save(load_file(str(p / "model.safetensors")), p / "pytorch_model.bin"),
                (p / "model.safetensors").unlink()),
     r"pytorch_model.bin: pickle checkpoints are not loaded"),
])
def test_model_loading_is_strict(model_dir, breakage, message):
    load_model_dir(model_dir)  # intact: loads
    breakage(model_dir)
    with pytest.raises(UserError, match=message):
        load_model_dir(model_dir)


def test_a_broken_model_is_one_line_and_exit_2(model_dir, data_dir, capsys):
    _edit_weights(model_dir, lambda w: w.pop("model.decoder.layers.0.fc2.bias"))
    assert main(["evaluate", str(model_dir), "--data", str(data_dir), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(model_dir / "model.safetensors") in err


def test_nothing_unpickles_without_weights_only():
    calls = [(path.name, line) for path in (SRC / "combinekd").glob("*.py")
             for line in path.read_text().splitlines() if re.search(r"torch\.load\(", line)]
    assert all("weights_only=True" in line for _, line in calls), calls


# ----------------------------------------------------------------------------- 5. numerics
def _nan_loss_at(monkeypatch, calls) -> None:
    """Make the objective's loss NaN on the given forward calls (1-based; one call per update here)."""
    original, counter = Objective.forward, itertools.count(1)

    def forward(self, batch):
        output = original(self, batch)
        if next(counter) in calls:
            output["loss"] = output["loss"] * float("nan")
        return output

    monkeypatch.setattr(Objective, "forward", forward)


def test_a_non_finite_loss_skips_the_update(data_dir, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {3, 4})
    out = tmp_path / "run"
    summary = train(tiny_config(data_dir, out, **QUICK, **{"train.max_steps": 6, "train.eval_every": 6}))
    assert summary["steps"] == 6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    skipped = [e for e in log if "skipped_update" in e]
    assert [(e["step"], e["bad_steps"]) for e in skipped] == [(2, 1), (2, 2)]
    assert all(e["loss"] == e["loss"] for e in log if "loss" in e), "no NaN reaches the logged losses"
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 6 and state["progress"]["bad_steps"] == 0
    optimizer = load_file(str(out / "checkpoints/last/optimizer.safetensors"))
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {6.0}, "6 optimizer steps, not 8"
    weights = checkpoint_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_losses_in_a_row_stop_the_run(data_dir, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, range(3, 1000))
    cfg = tiny_config(data_dir, tmp_path / "run", **QUICK, **{"train.max_steps": 20, "train.max_bad_steps": 3})
    with pytest.raises(UserError, match=r"not finite in 3 updates in a row .*train.max_bad_steps=3"):
        train(cfg)


# ----------------------------------------------------------------------------- 6. files others can use
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        data = prepare_corpus(write_corpus(tmp_path / "c", {"train": 300, "dev": 10, "test": 10}), tmp_path / "data")
        out = tmp_path / "run"
        train(tiny_config(data, out, **QUICK, **{"train.max_steps": 2, "train.eval_every": 2}))
    finally:
        os.umask(old)
    assert (out / "model.safetensors").is_file() and (out / "checkpoints/last/optimizer.safetensors").is_file()
    for root in (data, out):
        modes = _modes(root)
        wrong = {name: oct(mode) for name, mode in modes.items()
                 if mode != (0o755 if (root / name).is_dir() else 0o644)}
        assert not wrong, wrong


def test_atomic_writes_follow_any_umask_and_leave_nothing_behind(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "a.txt") as staged:
            staged.write_text("one")
        with atomic_dir(tmp_path / "d") as staged:
            (staged / "sub").mkdir()
            save_file({"x": torch.zeros(1)}, str(staged / "sub" / "w.safetensors"))
        with pytest.raises(RuntimeError):
            with atomic_dir(tmp_path / "d") as staged:
                (staged / "half").write_text("x")
                raise RuntimeError("interrupted")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "one" and (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert _modes(tmp_path / "d") == {".": 0o750, "sub": 0o750, "sub/w.safetensors": 0o640}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"], "no staging left, old content kept"


def test_recover_after_a_kill_between_the_two_renames(tmp_path):
    last = tmp_path / "checkpoints" / "last"
    (tmp_path / "checkpoints" / ".last.old-x1").mkdir(parents=True)  # the previous checkpoint, moved aside
    (tmp_path / "checkpoints" / ".last.old-x1" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".last.tmp-x2").mkdir()  # the new one, never renamed into place
    recover(last)
    assert (last / "trainer_state.json").read_text() == "{}"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]


# ----------------------------------------------------------------------------- 7. several processes
def test_checkpoints_keep_every_process_rng_state(data_dir, tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    split = Split(src=[[5, 0]] * 4, tgt=[[6, 0]] * 4)
    states = []
    for seed in (11, 22):
        torch.manual_seed(seed)
        random.seed(seed)
        states.append(rng_state())
    path = tmp_path / "checkpoints" / "last"
    save_checkpoint(path, model, optimizer, scheduler, BatchStream(split, 8, 1, 1, rank=0, world=2),
                    TrainerState(step=1), states)
    assert {p.name for p in path.glob("rng.*")} == {"rng.0.safetensors", "rng.1.safetensors"}
    for rank in (1, 0):
        torch.manual_seed(0)
        random.seed(0)
        state = TrainerState()
        load_checkpoint(path, model, optimizer, scheduler, BatchStream(split, 8, 1, 1, rank=rank, world=2), state)
        assert state.step == 1
        assert torch.equal(torch.get_rng_state(), states[rank]["tensors"]["torch"])
        assert random.random() == random.Random(11 * (rank + 1)).random()
    with pytest.raises(UserError, match="written by 2 processes"):
        load_checkpoint(path, model, optimizer, scheduler, BatchStream(split, 8, 1, 1), TrainerState())


def test_the_readme_conversion_makes_a_pickle_only_model_loadable(model_dir):
    """README, "A downloaded pretrained teacher": from_pretrained + save_pretrained writes safetensors."""
    from transformers import AutoModelForSeq2SeqLM

    model, _ = load_model_dir(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")  # what an old download holds
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="pickle"):
        load_model_dir(model_dir)
    AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).save_pretrained(str(model_dir))
    again, _ = load_model_dir(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
