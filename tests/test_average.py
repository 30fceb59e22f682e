"""Checkpoint averaging: the models a run keeps, and `combinekd average`."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from combinekd.average import MODELS, keep_model, kept_models
from combinekd.cli import main
from combinekd.models import load_model_dir


def test_a_run_keeps_its_last_evaluated_models(trained_model):
    out, _ = trained_model  # 400 updates, evaluated every 100, train.keep_models 6 (the default)
    assert [step for step, _ in kept_models(out)] == [100, 200, 300, 400]


def test_keep_model_keeps_only_the_last_n(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (10, 20, 30):
        keep_model(model, tmp_path / "run", step, keep=2)
    models = tmp_path / "run" / "checkpoints" / "models"
    (models / ".step-00000040.safetensors.tmp-x1y2").write_bytes(b"half")  # a run killed while writing
    keep_model(model, tmp_path / "run", 40, keep=2)
    assert [step for step, _ in kept_models(tmp_path / "run")] == [30, 40]
    assert sorted(p.name for p in models.iterdir()) == ["step-00000030.safetensors", "step-00000040.safetensors"]
    keep_model(model, tmp_path / "none", 10, keep=0)
    assert not (tmp_path / "none").exists()


def test_average_is_the_mean_of_the_last_models(trained_model, data_dir, tmp_path, capsys):
    out, _ = trained_model
    averaged = tmp_path / "averaged"
    assert main(["average", str(out), "--out", str(averaged), "--last", "2"]) == 0
    assert "updates 300, 400" in capsys.readouterr().out

    a, b = (load_file(str(out / MODELS / f"step-{step:08d}.safetensors")) for step in (300, 400))
    model = load_model_dir(averaged)[0].state_dict()
    for name in a:
        torch.testing.assert_close(model[name], (a[name] + b[name]) / 2)
    assert not torch.equal(a["model.encoder.layers.0.fc1.weight"], b["model.encoder.layers.0.fc1.weight"])

    info = json.loads((averaged / "averaged.json").read_text())
    assert info["steps"] == [300, 400] and set(info["dev_bleu_during_training"]) == {"300", "400"}
    card = (averaged / "README.md").read_text()
    assert "# averaged" in card and "the mean of the models of updates 300" in card
    assert "dev (best, during training)" not in card  # that score is the best single model's

    # the average still translates the task, and `evaluate` records its score in its card
    assert main(["evaluate", str(averaged), "--data", str(data_dir), "--beam", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bleu"] > 60, result
    assert f"| {result['bleu']:.2f} |" in (averaged / "README.md").read_text()


def test_average_refuses_clearly(trained_model, data_dir, tmp_path, capsys):
    out, _ = trained_model
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        ([str(out), "--out", str(existing)], "exists: add --overwrite"),
        ([str(out), "--out", str(tmp_path / "a"), "--last", "9"], "kept only 4 models (updates 100, 200, 300, 400)"),
        ([str(data_dir), "--out", str(tmp_path / "b")], "kept no models to average"),
        ([str(out), "--out", str(out)], "exists: add --overwrite"),
        ([str(out), "--out", str(out), "--overwrite"], "--out must differ from RUN_DIR"),
    ]
    for args, message in cases:
        assert main(["average", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not any(existing.iterdir())
