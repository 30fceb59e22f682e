"""End-to-end training, exact resume, evaluation JSON, translation and loading with plain transformers."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from combinekd.cli import main
from combinekd.config import load_config
from combinekd.errors import UserError
from combinekd.trainer import train

from conftest import has_translation_pipeline, tiny_config


def test_tiny_model_learns_the_task(trained_model):
    out, summary = trained_model
    assert summary["steps"] == 400
    assert summary["best_dev_bleu"] > 60, summary  # a random model scores ~0 on this task
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] / 3
    assert (out / "checkpoints" / "last" / "trainer_state.json").is_file()
    assert any((out / "tensorboard").iterdir())


def test_evaluate_json(trained_model, data_dir, capsys):
    out, _ = trained_model
    code = main(["evaluate", str(out), "--data", str(data_dir), "--beam", "2", "--json",
                 "--refs", str(data_dir / "test.tgt")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bleu", "chrf", "signature", "n_sentences", "params"} <= result.keys()
    assert result["n_sentences"] == 60 and result["n_refs"] == 2 and result["bleu"] > 60
    assert result["signature"].startswith("nrefs:2|")
    assert len((out / "test.hyp.yy").read_text().splitlines()) == 60


def test_translate_stdin_to_stdout(trained_model, monkeypatch, capsys):
    out, _ = trained_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("w1 w2 w3\nw5 w5 w9 w0\n"))
    assert main(["translate", str(out), "--beam", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[0] == "v1" and lines[1].startswith("v5")


def test_transformers_loads_the_output_dir(trained_model):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out, _ = trained_model
    tokenizer, model = AutoTokenizer.from_pretrained(str(out)), AutoModelForSeq2SeqLM.from_pretrained(str(out))
    ids = model.generate(**tokenizer(["w4 w8 w12 w2"], return_tensors="pt"), num_beams=2)
    assert tokenizer.decode(ids[0], skip_special_tokens=True).split()[0] == "v4"
    if has_translation_pipeline():
        from transformers import pipeline

        translator = pipeline("translation", model=str(out))
        text = translator("w4 w8 w12 w2", num_beams=2)[0]["translation_text"]
        assert text.split()[0] == "v4"


def test_the_generation_config_is_not_marked_as_derived(trained_model):
    """transformers 4.x rebuilds a generation config marked as derived from config.json whenever config.json
    holds a generation setting, as 5.x's does (forced_eos_token_id): beam 5 and the length limit would be lost."""
    saved = json.loads((trained_model[0] / "generation_config.json").read_text())
    assert saved["num_beams"] == 5 and saved["max_length"] == 64 and not saved.get("_from_model_config")


def _weights(path):
    return load_file(str(path / "checkpoints" / "last" / "objective.safetensors"))


def test_resume_is_exact(data_dir, tmp_path):
    straight = tiny_config(data_dir, tmp_path / "a", **{"train.max_steps": 12, "train.eval_every": 6})
    train(straight)
    first_half = tiny_config(data_dir, tmp_path / "b", **{"train.max_steps": 6, "train.eval_every": 6})
    train(first_half)
    with pytest.raises(UserError, match="already holds a run"):
        train(first_half)
    train(tiny_config(data_dir, tmp_path / "b", **{"train.max_steps": 12, "train.eval_every": 6}), resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = json.loads((tmp_path / "a/checkpoints/last/trainer_state.json").read_text())
    state_b = json.loads((tmp_path / "b/checkpoints/last/trainer_state.json").read_text())
    assert state_a["stream"] == state_b["stream"] and state_a["scheduler"] == state_b["scheduler"]


def _lrs(run_dir):
    return {e["step"]: e["lr"] for e in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
            if "lr" in e}


def test_the_linear_schedule_decays_to_zero_at_max_steps_and_is_fixed_on_resume(data_dir, tmp_path):
    sets = {"train.schedule": "linear", "train.warmup_steps": 4, "train.eval_every": 6, "train.log_every": 2}
    train(tiny_config(data_dir, tmp_path / "a", **sets, **{"train.max_steps": 12}))
    lrs = _lrs(tmp_path / "a")
    assert lrs[2] == pytest.approx(1e-3 * 2 / 4) and lrs[4] == pytest.approx(1e-3)  # the warm-up, then down
    assert lrs[8] == pytest.approx(1e-3 * 4 / 8) and lrs[12] == 0.0
    # the inverse-sqrt default, same run otherwise, is still at 1e-3 * sqrt(4 / 12) there
    train(tiny_config(data_dir, tmp_path / "c", **{**sets, "train.schedule": "inverse-sqrt", "train.max_steps": 12}))
    assert _lrs(tmp_path / "c")[12] == pytest.approx(1e-3 * (4 / 12) ** 0.5)
    # stopped half-way (a time budget) and resumed: exactly the uninterrupted run
    train(tiny_config(data_dir, tmp_path / "b", **sets, **{"train.max_steps": 12, "train.max_hours": 1e-9}))
    for changed in ({"train.max_steps": 18}, {"train.schedule": "inverse-sqrt", "train.max_steps": 12}):
        with pytest.raises(UserError, match="resume it with the same train.schedule"):
            train(tiny_config(data_dir, tmp_path / "b", **{**sets, **changed}), resume=True)
    train(tiny_config(data_dir, tmp_path / "b", **sets, **{"train.max_steps": 12}), resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_train_optimises_the_objective_it_is_given(data_dir, tmp_path):
    from combinekd.data import load_tokenizer
    from combinekd.distill import build_objective

    cfg = tiny_config(data_dir, tmp_path / "run", **{"train.max_steps": 2, "train.eval_every": 2,
                                                      "train.eval_max_sentences": 4})
    torch.manual_seed(0)
    objective = build_objective(cfg, load_tokenizer(data_dir))
    before = {name: value.clone() for name, value in objective.state_dict().items()}
    train(cfg, objective)
    after, saved = objective.state_dict(), _weights(tmp_path / "run")
    assert all(torch.equal(saved[name], after[name]) for name in saved), "the given objective was trained"
    assert not all(torch.equal(before[name], after[name]) for name in saved)


def test_resume_without_a_run_is_a_user_error(data_dir, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny_config(data_dir, tmp_path / "none"), resume=True)


def test_early_stopping(data_dir, tmp_path):
    # lr 0 never improves after the first evaluation: patience 2 stops after 3 evaluations
    cfg = tiny_config(data_dir, tmp_path / "es", **{"train.lr": 1e-12, "train.max_steps": 100,
                                                     "train.eval_every": 2, "train.patience": 2})
    summary = train(cfg)
    assert summary["stopped_early"] and summary["steps"] == 6


@pytest.mark.parametrize("patience_on, steps", [("bleu", 6), ("bleu-or-loss", 12)])
def test_patience_counts_a_falling_dev_loss_as_progress_unless_told_bleu_only(data_dir, tmp_path, patience_on,
                                                                               steps):
    # 12 warm-up updates of a tiny model: dev BLEU stays where it started while the dev loss falls at every
    # evaluation; counted on BLEU alone, patience 2 stops after the third evaluation
    cfg = tiny_config(data_dir, tmp_path / "run", **{"train.max_steps": 12, "train.eval_every": 2,
                                                     "train.patience": 2, "train.patience_on": patience_on})
    summary = train(cfg)
    assert summary["steps"] == steps and summary["stopped_early"] == (patience_on == "bleu")
    evals = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()
             if "dev_bleu" in line]
    assert len({e["dev_bleu"] for e in evals}) == 1, "premise: dev BLEU never improves after the first evaluation"
    assert all(b["dev_loss"] < a["dev_loss"] * (1 - 1e-3) for a, b in zip(evals, evals[1:])), "premise: loss falls"


def test_a_larger_patience_resumes_an_early_stopped_run_exactly(data_dir, tmp_path, capsys):
    # the best dev BLEU comes at the first evaluation (lr ~0): patience 2 stops at 6, patience 4 at 10
    sets = {"train.lr": 1e-12, "train.max_steps": 100, "train.eval_every": 2}
    straight = train(tiny_config(data_dir, tmp_path / "a", **sets, **{"train.patience": 4}))
    assert straight["stopped_early"] and straight["steps"] == 10
    assert train(tiny_config(data_dir, tmp_path / "b", **sets, **{"train.patience": 2}))["steps"] == 6
    assert train(tiny_config(data_dir, tmp_path / "b", **sets, **{"train.patience": 2}), resume=True)["steps"] == 6
    assert "raise train.patience to train on" in capsys.readouterr().err
    resumed = train(tiny_config(data_dir, tmp_path / "b", **sets, **{"train.patience": 4}), resume=True)
    assert resumed["stopped_early"] and resumed["steps"] == 10
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_time_budget_stops_at_an_evaluation_and_a_larger_one_resumes_exactly(data_dir, tmp_path, capsys):
    straight = tiny_config(data_dir, tmp_path / "a", **{"train.max_steps": 12, "train.eval_every": 6})
    train(straight)
    # a budget any run exceeds: the run stops at its first evaluation, with a summary and a card
    budget = {"train.max_steps": 12, "train.eval_every": 6, "train.max_hours": 1e-9}
    summary = train(tiny_config(data_dir, tmp_path / "b", **budget))
    assert summary["steps"] == 6 and summary["stopped_by"] == "max_hours" and not summary["stopped_early"]
    assert json.loads((tmp_path / "b/train_summary.json").read_text())["stopped_by"] == "max_hours"
    assert "time budget (train.max_hours) was spent" in (tmp_path / "b/README.md").read_text()
    assert train(tiny_config(data_dir, tmp_path / "b", **budget), resume=True)["steps"] == 6
    assert "raise train.max_hours to train on" in capsys.readouterr().err
    resumed = train(tiny_config(data_dir, tmp_path / "b", **{**budget, "train.max_hours": 0}), resume=True)
    assert resumed["steps"] == 12 and resumed["stopped_by"] == "max_steps"
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("sets, message", [
    (["model.layers=3"], "model.layers: unknown key"),
    (["train.max_steps=-1"], "train.max_steps"),
    (["model.d_model=100", "model.heads=3"], "divisible by heads"),
    (["distill.teacher=/x", "distill.encoder.strategy=nope"], "distill.encoder.strategy"),
    (["distill.teacher=/x", "distill.encoder.strategy=groups"], "give `groups` exactly"),
    (["nonsense"], "KEY=VALUE"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, sets, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path}\noutput_dir: {tmp_path / 'o'}\n")
    args = ["train", str(config)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_files_are_user_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a prepared data dir" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'nodata'}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["train", str(config)]) == 2
    assert "not a prepared data dir" in capsys.readouterr().err


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.bf16=false", "model.dropout=0.3", "distill.teacher=t",
                             "distill.encoder.groups=[[1,2],[3]]", "distill.encoder.strategy=groups"],
                      base={"data_dir": "d", "output_dir": "o"})
    assert cfg.train.bf16 is False and cfg.model.dropout == 0.3
    assert cfg.distill.encoder.groups == [[1, 2], [3]] and cfg.distill.encoder.loss == "mse"


@pytest.mark.parametrize("arch", ["pre-ln", "post-ln"])
@pytest.mark.parametrize("which", ["attention_dropout", "activation_dropout"])
def test_attention_and_activation_dropout_reach_the_model(data_dir, arch, which):
    """With the residual dropout at 0, training-mode forwards differ only if the chosen dropout acts."""
    from combinekd.config import ModelConfig
    from combinekd.data import load_tokenizer
    from combinekd.models import build_model

    tokenizer = load_tokenizer(data_dir)
    shape = dict(arch=arch, encoder_layers=1, decoder_layers=1, d_model=32, ffn_dim=64, heads=2, max_length=64,
                 dropout=0.0)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 2]]), "decoder_input_ids": torch.tensor([[3, 8, 9]])}

    def two_training_forwards(**dropout):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**shape, **dropout), tokenizer).train()
        return model(**batch).logits, model(**batch).logits

    assert torch.equal(*two_training_forwards())
    assert not torch.equal(*two_training_forwards(**{which: 0.5}))


def test_compare_prints_a_table_with_bootstrap(trained_model, data_dir, capsys):
    out, _ = trained_model
    assert main(["compare", str(out), str(out), "--data", str(data_dir), "--beam", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["bleu"] == rows[1]["bleu"]
    assert rows[0]["bootstrap"]["p_value"] is None  # the baseline
    assert 0 < rows[1]["bootstrap"]["p_value"] <= 1 and rows[1]["bootstrap"]["ci"] is not None


def test_compare_limit_scores_the_first_sentences(trained_model, data_dir, capsys):
    out, _ = trained_model
    assert main(["compare", str(out), "--data", str(data_dir), "--beam", "1", "--limit", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n_sentences"] == 7


def test_weight_presets_fill_only_missing_weights():
    base = {"data_dir": "d", "output_dir": "o"}
    paper = load_config(None, ["distill.teacher=t", "distill.weights=paper", "distill.w_soft=0.9"], base=base)
    assert (paper.distill.w_hard, paper.distill.w_soft, paper.distill.w_layer) == (0.1, 0.9, 0.7)
    default = load_config(None, ["distill.teacher=t"], base=base).distill
    from combinekd.config import WEIGHT_PRESETS

    assert default.weights == "paper"
    assert {k: getattr(default, k) for k in WEIGHT_PRESETS["paper"]} == WEIGHT_PRESETS["paper"]
    # a saved config (weights written out) loads back to the same weights
    assert load_config(None, [f"distill.{k}={v}" for k, v in paper.distill.model_dump(mode="json").items()
                              if k.startswith("w_")] + ["distill.teacher=t"], base=base).distill.w_soft == 0.9


def test_summary_splits_the_wall_time(trained_model):
    out, summary = trained_model
    split = json.loads((out / "train_summary.json").read_text())["wall_seconds"]
    assert split["training"] > 0 and split["validation"] > 0 and split["saving_models_and_checkpoints"] > 0
    assert split["of_which_teacher_forward"] == 0.0  # no teacher: plain training


def test_overrides_merge_sections_and_leave_the_callers_dicts_alone(tmp_path):
    base = {"data_dir": "d", "output_dir": "o", "model": {"encoder_layers": 3, "d_model": 64, "heads": 4}}
    snapshot = json.dumps(base, sort_keys=True)
    cfg = load_config(None, ["model.decoder_layers=1", "model={encoder_layers: 5}"], base=base)
    assert json.dumps(base, sort_keys=True) == snapshot, "--set modified the caller's dict"
    assert (cfg.model.encoder_layers, cfg.model.decoder_layers, cfg.model.d_model) == (5, 1, 64)
    (tmp_path / "c.yaml").write_text("model: {decoder_layers: 2}\n")
    from_file = load_config(tmp_path / "c.yaml", base=base)
    assert (from_file.model.encoder_layers, from_file.model.decoder_layers) == (3, 2)


def test_the_update_is_normalised_by_all_its_target_tokens(data_dir, tmp_path):
    """Gradient accumulation weights each micro-batch by its target tokens (fairseq), not 1/grad_accum."""
    from accelerate import Accelerator

    from combinekd.data import collate, load_split, load_tokenizer
    from combinekd.distill import build_objective
    from combinekd.trainer import accumulate_gradients

    tokenizer = load_tokenizer(data_dir)
    split = load_split(data_dir, "train")
    micro = [collate(split, [0, 1, 2, 3, 4], tokenizer.pad_token_id), collate(split, [5], tokenizer.pad_token_id)]
    tokens = [int((b["labels"] != -100).sum()) for b in micro]
    assert tokens[0] != tokens[1]
    torch.manual_seed(0)
    objective = build_objective(tiny_config(data_dir, tmp_path / "o", **{"model.dropout": 0.0}), tokenizer)
    parts, total = accumulate_gradients(Accelerator(cpu=True), objective, micro)
    assert total == sum(tokens)
    params = [p for p in objective.parameters() if p.grad is not None]
    got = [p.grad.clone() for p in params]

    objective.zero_grad()
    losses = [objective(b)["loss"] for b in micro]
    reference = sum(loss * n for loss, n in zip(losses, tokens)) / sum(tokens)
    reference.backward()
    assert params and all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got, params))
    assert parts["loss"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_the_run_log_is_silent_off_the_main_process(tmp_path):
    from combinekd.trainer import RunLog

    quiet = RunLog(tmp_path / "other", active=False, total_steps=3, initial_step=0)
    quiet.record({"step": 1, "loss": 2.0})
    quiet.say("nothing")
    quiet.close()
    assert not (tmp_path / "other").exists()
    (tmp_path / "main").mkdir()
    log = RunLog(tmp_path / "main", active=True, total_steps=3, initial_step=0)
    log.record({"step": 1, "loss": 2.0})
    log.close()
    assert json.loads((tmp_path / "main" / "train_log.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    assert any((tmp_path / "main" / "tensorboard").iterdir())


def test_dev_loss_is_the_models_cross_entropy_per_target_token(trained_model, data_dir):
    """validate's dev loss (the output layer applied inside the loss, a chunk at a time) equals
    PyTorch's cross-entropy over the model's own full logits, summed over batches, per token."""
    from contextlib import nullcontext

    from combinekd.data import collate, load_split, load_tokenizer, split_text
    from combinekd.distill import decoder_input_ids
    from combinekd.models import load_model_dir
    from combinekd.trainer import validate

    out, _ = trained_model
    model, tokenizer = load_model_dir(out)
    cfg = load_config(str(out / "train_config.yaml"), [f"data_dir={data_dir}", "train.eval_max_sentences=4"])
    dev = load_split(data_dir, "dev")
    scores = validate(model, tokenizer, dev, split_text(data_dir, "dev"), cfg, nullcontext)
    batch = collate(dev, list(range(len(dev.src))), tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model.eval()(**batch, decoder_input_ids=decoder_input_ids(model, labels)).logits
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels)
    assert scores["dev_loss"] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(data_dir, tmp_path, monkeypatch, capsys, bf16):
    import platform

    import torch.cpu

    from combinekd.models import slow_bf16_warning

    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert "neither AVX-512 BF16 nor AMX" in slow_bf16_warning("cpu") and slow_bf16_warning("cuda") is None
    train(tiny_config(data_dir, tmp_path / "run", **{"train.bf16": bf16, "train.max_steps": 2, "train.eval_every": 2}))
    warned = [line for line in capsys.readouterr().err.splitlines() if "neither AVX-512 BF16 nor AMX" in line]
    assert warned == (["combinekd: warning: train.bf16 on, but this CPU has neither AVX-512 BF16 nor AMX, so bf16 is "
                       "emulated and usually slower than fp32 here: consider --set train.bf16=auto"] if bf16 else [])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # AMX (or AVX-512 BF16): no warning
    assert slow_bf16_warning("cpu") is None


def test_bf16_auto_is_on_only_where_bf16_is_native(data_dir, tmp_path, monkeypatch, capsys):
    """The default: bf16 autocast and a bf16 teacher on a CPU with AMX or AVX-512 BF16, float32 on one with
    neither (no warning: nothing to turn off), said in the run's precision line; true and false as they say."""
    import platform

    import torch.cpu

    from combinekd.models import native_bf16, use_bf16
    from conftest import save_random_model

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    teacher = save_random_model(data_dir, tmp_path / "teacher", seed=1, encoder_layers=2, decoder_layers=1,
                                d_model=64, ffn_dim=128, heads=4)
    precisions = {}
    for native in (False, True):
        for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, check, lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        assert native_bf16("cpu") is native and use_bf16("auto", "cpu") is native
        assert use_bf16(True, "cpu") is True and use_bf16(False, "cpu") is False
        out = tmp_path / f"run-{native}"
        train(tiny_config(data_dir, out, **{"train.bf16": "auto", "train.max_steps": 2, "train.eval_every": 2,
                                            "distill.teacher": str(teacher), "distill.teacher_bf16": "auto"}))
        printed = capsys.readouterr()
        assert "warning" not in printed.err, printed.err
        first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
        precisions[native] = first["precision"]
        assert f"precision: {first['precision']}" in printed.out + printed.err
    assert precisions[True] == "bf16 autocast, teacher in bfloat16"
    assert precisions[False] == ("float32, teacher in float32 (bf16 auto: this CPU has neither AVX-512 BF16 nor AMX, "
                                 "so bf16 is emulated and usually slower than fp32 here)")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # not known: auto stays off
    assert native_bf16("cpu") is None and use_bf16("auto", "cpu") is False


def test_a_bf16_teacher_and_bf16_decoding_are_warned_about_too(data_dir, tmp_path, monkeypatch, capsys):
    """The other two bf16 switches on such a CPU: distill.teacher_bf16 (train.bf16 off) and --dtype bfloat16."""
    import platform

    import torch.cpu

    from combinekd.engines import load_translator
    from conftest import save_random_model

    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    teacher = save_random_model(data_dir, tmp_path / "teacher", seed=1, encoder_layers=2, decoder_layers=1,
                                d_model=64, ffn_dim=128, heads=4)
    train(tiny_config(data_dir, tmp_path / "run", **{"train.max_steps": 2, "train.eval_every": 2,
                                                      "distill.teacher": str(teacher), "distill.teacher_bf16": True}))
    warned = [line for line in capsys.readouterr().err.splitlines() if "neither AVX-512 BF16 nor AMX" in line]
    assert len(warned) == 1 and "distill.teacher_bf16 on" in warned[0] and "train.bf16" not in warned[0], warned
    assert warned[0].endswith("consider --set distill.teacher_bf16=auto")
    for dtype in ("float32", "bfloat16"):
        load_translator(teacher, dtype)
    warned = [line for line in capsys.readouterr().err.splitlines() if "neither AVX-512 BF16 nor AMX" in line]
    assert main(["benchmark", str(teacher), "--data", str(data_dir), "--limit", "2", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "bench")]) == 0
    warned += [line for line in capsys.readouterr().err.splitlines() if "neither AVX-512 BF16 nor AMX" in line]
    assert warned == 2 * ["combinekd: warning: --dtype bfloat16, but this CPU has neither AVX-512 BF16 nor AMX, so bf16 "
                      "is emulated and usually slower than fp32 here: consider --dtype float32"]


def test_the_cpu_dropout_keeps_one_minus_p_and_rescales_as_torchs():
    from combinekd.models import _cpu_dropout

    torch.manual_seed(0)
    x = torch.ones(1000, 1000, dtype=torch.bfloat16, requires_grad=True)
    y = _cpu_dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.003
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.7))  # the scale torch's dropout applies (bf16)
    y.float().sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask, scaled
    # the other cases are torch's own: not training, p = 0 (the attention weights here), in place
    assert _cpu_dropout(x, 0.3, training=False) is x and torch.equal(_cpu_dropout(x, 0.0), x)
    # seeded: the same draws again
    torch.manual_seed(0)
    assert torch.equal(_cpu_dropout(x, 0.3), y)
    # each of the four 16-bit draws of a 64-bit one is uniform (a 63-bit draw would keep every fourth element),
    # and a size that is no multiple of 4 works
    y = _cpu_dropout(torch.ones(250_001, 4), 0.1)
    assert y.shape == (250_001, 4)
    assert all(abs(f - 0.9) < 0.003 for f in (y != 0).float().mean(0).tolist())


def test_training_forwards_use_the_cpu_dropout_and_torchs_is_restored(data_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    from combinekd import models

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return models._TORCH_DROPOUT(*args, **kwargs)

    monkeypatch.setattr(models, "_cpu_dropout", counting)
    train(tiny_config(data_dir, tmp_path / "run", **{"train.max_steps": 2, "train.eval_every": 2}))
    # 2 updates of a 2+2 model: embeddings 2, encoder layers 2 x 3, decoder layers 2 x 4 (with p = 0 calls)
    assert len(calls) >= 2 * 16
    assert F.dropout is models._TORCH_DROPOUT
    with pytest.raises(RuntimeError), models.fast_cpu_dropout():
        raise RuntimeError
    assert F.dropout is models._TORCH_DROPOUT
