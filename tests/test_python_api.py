"""The README's Python example (section "From Python") runs as written, on the tiny corpus."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import save_random_model, tiny_config

from combinekd.config import dump_config

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_block() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its python-api block"
    return match.group(1)


def test_the_readme_python_example_runs(data_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSeq2SeqLM

    block = readme_python_block()
    code = block.replace('"train.max_steps=300"', '"train.max_steps=4"')  # the only change: fewer updates
    assert code != block
    # what the example expects from the repository root: the student config, prepared data, a teacher
    (tmp_path / "configs").mkdir()
    student = tiny_config(data_dir, tmp_path / "unused", **{
        "distill.teacher": "unused", "distill.encoder.strategy": "overlap", "train.eval_every": 2,
        "train.eval_max_sentences": 8})
    (tmp_path / "configs" / "student-cpu.yaml").write_text(dump_config(student), encoding="utf-8")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "data").symlink_to(data_dir)
    save_random_model(data_dir, tmp_path / "runs" / "teacher-cpu", seed=1, encoder_layers=4, decoder_layers=2,
                      d_model=64, ffn_dim=128, heads=4)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (python-api)", "exec"), {})
    printed = capsys.readouterr().out
    assert "max_steps" in printed and "'layer_encoder'" in printed  # the run's summary, the loss's terms
    assert (tmp_path / "runs" / "student-api" / "train_summary.json").is_file()
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "runs" / "student-own-loop")
    assert model.config.encoder_layers == 2
