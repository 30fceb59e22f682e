"""CTranslate2 export: conversion, identical greedy output, evaluate/translate on the export, errors, cards."""

from __future__ import annotations

import io
import json
import sys

import pytest

from combinekd.cli import main
from conftest import tiny_config


@pytest.fixture(scope="module")
def exports(trained_model, tmp_path_factory):
    from combinekd.export import export_model

    model_dir, _ = trained_model
    root = tmp_path_factory.mktemp("ct2")
    for quantization in ("float32", "int8"):
        export_model(model_dir, root / quantization, quantization=quantization)
    return {"float32": root / "float32", "int8": root / "int8"}


SENTENCES = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w15 w0 w9 w9", "w3 w12 w7 w10 w11 w2 w14"]


def test_export_writes_a_complete_ct2_dir(exports, trained_model):
    for quantization, path in exports.items():
        names = {p.name for p in path.iterdir()}
        assert {"model.bin", "config.json", "shared_vocabulary.json", "source.spm", "target.spm", "vocab.json",
                "tokenizer_config.json", "combinekd_export.json", "README.md"} <= names, names
        assert not any(n.startswith(".") for n in names)
        info = json.loads((path / "combinekd_export.json").read_text())
        assert info["quantization"] == quantization and info["source_model"] == str(trained_model[0].resolve())
        assert (info["source_lang"], info["target_lang"]) == ("xx", "yy") and info["params"] > 0
    assert (exports["int8"] / "model.bin").stat().st_size < (exports["float32"] / "model.bin").stat().st_size


def test_float32_and_int8_exports_translate(exports):
    from combinekd.engines import CT2Translator, load_translator

    for path in exports.values():
        engine = load_translator(path)
        assert isinstance(engine, CT2Translator)
        hyps = engine.translate(SENTENCES + [""], beam=5, batch_size=2)
        assert hyps[-1] == "" and all(h.startswith("v") for h in hyps[:-1]), hyps


def test_ct2_float32_greedy_equals_hf_greedy_token_for_token(exports, trained_model):
    import torch

    from combinekd.engines import load_translator

    hf, ct2 = load_translator(trained_model[0]), load_translator(exports["float32"])
    tok = hf.tokenizer
    for sentence in SENTENCES:  # one at a time: no padding differences
        enc = tok([sentence], return_tensors="pt")
        with torch.no_grad():
            out = hf.model.generate(**enc, num_beams=1, do_sample=False, max_length=40)
        hf_tokens = [t for t in tok.convert_ids_to_tokens(out[0]) if t not in (tok.pad_token, tok.eos_token)]
        result = ct2.translator.translate_batch([tok.convert_ids_to_tokens(enc["input_ids"][0])], beam_size=1,
                                                max_decoding_length=40)
        assert result[0].hypotheses[0] == hf_tokens, sentence
    assert ct2.translate(SENTENCES, beam=1) == hf.translate(SENTENCES, beam=1)
    assert ct2.params == hf.params


def test_evaluate_and_translate_accept_the_ct2_dir(exports, trained_model, data_dir, tmp_path, monkeypatch, capsys):
    results = {}
    for name, path in (("hf", trained_model[0]), ("ct2", exports["float32"])):
        out = tmp_path / f"{name}.hyp"
        assert main(["evaluate", str(path), "--data", str(data_dir), "--beam", "2", "--out", str(out), "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["ct2"]["engine"] == "ctranslate2" and results["hf"]["engine"] == "transformers"
    assert results["ct2"]["signature"] == results["hf"]["signature"]
    assert abs(results["ct2"]["bleu"] - results["hf"]["bleu"]) < 1.0
    assert results["ct2"]["params"] == results["hf"]["params"]

    from combinekd.engines import load_translator

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(SENTENCES).encode())))
    assert main(["translate", str(exports["int8"]), "--beam", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == load_translator(exports["int8"]).translate(SENTENCES, beam=2)
    assert len(lines) == len(SENTENCES) and all(line.startswith("v") for line in lines)


def test_hf_models_decode_in_bfloat16_and_ct2_models_refuse_a_dtype(exports, trained_model, data_dir, tmp_path,
                                                                     monkeypatch, capsys):
    import torch

    from combinekd.engines import load_translator

    hf16 = load_translator(trained_model[0], "bfloat16")
    assert hf16.model.dtype == torch.bfloat16 and hf16.precision == "bfloat16"
    hyps = {dtype: load_translator(trained_model[0], dtype).translate(SENTENCES, beam=2) for dtype in ("float32", "bfloat16")}
    assert sum(a == b for a, b in zip(*hyps.values())) >= len(SENTENCES) - 1, hyps  # rounding may change one
    results = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["evaluate", str(trained_model[0]), "--data", str(data_dir), "--beam", "2", "--dtype", dtype,
                     "--out", str(tmp_path / f"{dtype}.hyp"), "--json"]) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    assert [r["precision"] for r in results.values()] == ["float32", "bfloat16"]
    assert abs(results["bfloat16"]["bleu"] - results["float32"]["bleu"]) < 2.0, results

    assert main(["evaluate", str(exports["int8"]), "--data", str(data_dir), "--dtype", "bfloat16",
                 "--out", str(tmp_path / "ct2.hyp")]) == 2
    assert "chosen when it was exported" in error_line(capsys) and not (tmp_path / "ct2.hyp").exists()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"w1 w2\n")))
    assert main(["translate", str(exports["int8"]), "--dtype", "float16"]) == 2
    assert "chosen when it was exported" in error_line(capsys)


def test_compare_accepts_hf_and_ct2_dirs_together(exports, trained_model, data_dir, capsys):
    assert main(["compare", str(trained_model[0]), str(exports["int8"]), "--data", str(data_dir),
                 "--beam", "1", "--limit", "20", "--dtype", "bfloat16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # --dtype: the Hugging Face model's precision only
    assert [(r["engine"], r["precision"]) for r in rows] == [("transformers", "bfloat16"), ("ctranslate2", "int8")]
    from combinekd.evaluate import markdown_table

    table = markdown_table(rows)
    assert f"| {trained_model[0]} (bfloat16) |" in table and "(CTranslate2 int8)" in table


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_export_errors_are_one_line_and_write_nothing(exports, trained_model, data_dir, tmp_path, capsys):
    model_dir = trained_model[0]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases = [
        ([str(data_dir)], "no model found"),
        ([str(bert)], "not a seq2seq"),
        ([str(exports["int8"])], "already a CTranslate2 dir"),
        ([str(model_dir), "--quantization", "int3"], "unknown quantization"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert main(["export", *args, "--out", str(out)]) == 2
        assert message in error_line(capsys)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    before = (exports["int8"] / "model.bin").stat().st_mtime_ns
    assert main(["export", str(model_dir), "--out", str(exports["int8"])]) == 2
    assert "--overwrite" in error_line(capsys)
    assert (exports["int8"] / "model.bin").stat().st_mtime_ns == before


def test_overwrite_replaces_an_export(trained_model, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["export", str(trained_model[0]), "--out", str(out), "--quantization", "int16"]) == 0
    assert main(["export", str(trained_model[0]), "--out", str(out), "--quantization", "float32",
                 "--overwrite"]) == 0
    assert json.loads((out / "combinekd_export.json").read_text())["quantization"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_ct2_dir_is_refused_as_a_teacher(exports):
    from combinekd.errors import UserError
    from combinekd.models import load_model_dir

    with pytest.raises(UserError, match="CTranslate2 export"):
        load_model_dir(exports["int8"])


def test_model_cards_name_the_right_scores(trained_model, exports):
    model_dir, summary = trained_model
    card = (model_dir / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- xx\n- yy\nlicense:")
    for tag in ("- translation", "- combinekd", "- knowledge-distillation", "- bleu", "- chrf"):
        assert tag in card
    assert f"| dev (best, during training) | {summary['best_dev_bleu']:.2f} |" in card
    assert "BLEU signature: `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in card
    assert f"best dev BLEU at update {summary['best_step']}" in card and "nrefs:1" in card
    assert "label-smoothed cross-entropy" in card
    export_card = (exports["int8"] / "README.md").read_text()
    assert "CTranslate2 export (int8)" in export_card and "\n# int8\n" in export_card
    assert f"{summary['best_dev_bleu']:.2f}" in export_card


def test_evaluate_records_test_scores_in_the_model_card(trained_model, exports, data_dir, tmp_path, capsys):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard",
                                                                               "scores.json"))
    export = tmp_path / "int8"
    shutil.copytree(exports["int8"], export)
    teacher_like = tmp_path / "not-ours"  # a downloaded model: no train_summary.json, its own README
    shutil.copytree(trained_model[0], teacher_like, ignore=shutil.ignore_patterns("checkpoints", "tensorboard",
                                                                                 "train_summary.json", "scores.json"))
    (teacher_like / "README.md").write_text("their card\n")
    results = {}
    for path, beam in ((model_dir, 2), (model_dir, 1), (model_dir, 2), (export, 2), (teacher_like, 2)):
        assert main(["evaluate", str(path), "--data", str(data_dir), "--beam", str(beam), "--limit", "30",
                     "--out", str(tmp_path / "hyp"), "--json"]) == 0
        results[path, beam] = json.loads(capsys.readouterr().out)
    card = (model_dir / "README.md").read_text()
    for beam in (2, 1):
        r = results[model_dir, beam]
        row = f"| test (`{data_dir}`, 30 sentences, beam {beam}, float32) | {r['bleu']:.2f} | {r['chrf']:.2f} |"
        assert card.count(row) == 1, card  # evaluated twice at beam 2: one row
    assert f"chrF signature: `{results[model_dir, 2]['chrf_signature']}`" in card
    assert "| dev (best, during training) |" in card and "label-smoothed cross-entropy" in card
    r = results[export, 2]
    export_card = (export / "README.md").read_text()
    assert f"| test (`{data_dir}`, 30 sentences, beam 2, int8) | {r['bleu']:.2f} | {r['chrf']:.2f} |" in export_card
    assert "CTranslate2 export (int8)" in export_card
    assert (teacher_like / "README.md").read_text() == "their card\n" and not (teacher_like / "scores.json").exists()


def test_a_new_best_model_drops_the_scores_of_the_one_it_replaces(data_dir, tmp_path, capsys):
    from combinekd.trainer import train

    out = tmp_path / "run"
    train(tiny_config(data_dir, out, **{"train.max_steps": 20, "train.eval_every": 20}))
    assert main(["evaluate", str(out), "--data", str(data_dir), "--beam", "1", "--limit", "10"]) == 0
    assert (out / "scores.json").is_file() and "| test (" in (out / "README.md").read_text()
    train(tiny_config(data_dir, out, **{"train.max_steps": 200, "train.eval_every": 20}), resume=True)
    best = json.loads((out / "train_summary.json").read_text())["best_step"]
    assert best > 20, best  # a better model replaced the evaluated one
    assert not (out / "scores.json").exists() and "| test (" not in (out / "README.md").read_text()


def test_a_students_card_names_teacher_weights_and_layer_mapping(tmp_path):
    from combinekd.card import write_train_card
    from combinekd.config import dump_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"src_lang": "pt", "tgt_lang": "en"}))
    model = tmp_path / "student"
    model.mkdir()
    cfg = tiny_student_config(data, model)
    (model / "train_config.yaml").write_text(dump_config(cfg))
    (model / "train_summary.json").write_text(json.dumps({"steps": 900, "best_step": 800, "best_dev_bleu": 31.456,
                                                          "pairs": 1234, "train_seconds": 5.0}))
    mapping = "encoder: student layer 1 <- teacher layers 1,2,3"
    (model / "train_log.jsonl").write_text(json.dumps({"step": 0, "objective": ["objective: 0.5 * hard", mapping]})
                                           + "\n" + json.dumps({"step": 100, "loss": 1.0}) + "\n")
    card = write_train_card(model).read_text()
    assert card.startswith("---\nlanguage:\n- pt\n- en\nlicense:")
    assert "teacher `/teacher/run`" in card and "w_hard 0.1, w_soft 0.2, w_layer 0.7" in card  # the default preset
    assert mapping in card and "| dev (best, during training) | 31.46 |" in card
    assert "Updates: 900 (best dev BLEU at update 800)" in card and "1234 training pairs" in card


def tiny_student_config(data, out):
    from combinekd.config import load_config

    return load_config(None, [], base={"data_dir": str(data), "output_dir": str(out),
                                       "distill": {"teacher": "/teacher/run"}})


def test_benchmark_measures_hf_and_ct2_models(exports, trained_model, data_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", str(trained_model[0]), str(exports["int8"]), "--data", str(data_dir),
                 "--limit", "6", "--threads", "1", "--dtype", "bfloat16", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "1 threads for every engine" in table and "ctranslate2 int8" in table
    assert "transformers bfloat16" in table  # --dtype: the Hugging Face models' precision only
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(r["engine"], r["precision"]) for r in results] == [("transformers", "bfloat16"), ("ctranslate2", "int8")]
    for result in results:
        assert result["params"] > 0 and result["size_bytes"] > 0 and result["peak_rss_mb"] > 0
        assert [(r["beam"], r["batch_size"]) for r in result["runs"]] == [(5, 32), (5, 1), (1, 32), (1, 1)]
        assert all(r["sentences_per_s"] > 0 and r["bleu"] > 0 for r in result["runs"])
        assert all("latency_p95_ms" in r for r in result["runs"] if r["batch_size"] == 1)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and out.with_suffix(".md").is_file()


def test_benchmark_rounds_alternate_the_models_and_report_medians(exports, data_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", str(exports["int8"]), str(exports["float32"]), "--data", str(data_dir), "--limit", "4",
                 "--threads", "1", "--rounds", "3", "--out", str(out)]) == 0
    assert "medians of 3 rounds" in capsys.readouterr().out
    for result in json.loads(out.with_suffix(".json").read_text()):
        assert result["rounds"] == 3
        for run in result["runs"]:
            assert len(run["sentences_per_s_rounds"]) == 3
            assert run["sentences_per_s"] == round(sorted(run["sentences_per_s_rounds"])[1], 2)


def test_combine_rounds_takes_medians_and_the_highest_memory():
    from combinekd.benchmark import combine_rounds

    def result(rss, speeds, p95):
        return {"model": "m", "peak_rss_mb": rss, "runs": [
            {"beam": 5, "batch_size": 1, "bleu": 30.0, "seconds": 10 / s, "sentences_per_s": s,
             "target_tokens_per_s": 20 * s, "latency_mean_ms": p95 / 2, "latency_p95_ms": p95} for s in speeds]}

    combined = combine_rounds([result(100, [2.0], 50), result(300, [4.0], 10), result(200, [1.0], 30)])
    assert combined["rounds"] == 3 and combined["peak_rss_mb"] == 300
    run = combined["runs"][0]
    assert (run["sentences_per_s"], run["target_tokens_per_s"], run["latency_p95_ms"], run["seconds"]) == (2.0, 40.0, 30, 5.0)
    assert run["sentences_per_s_rounds"] == [2.0, 4.0, 1.0] and run["bleu"] == 30.0
    assert combine_rounds([result(100, [2.0], 50)]) == result(100, [2.0], 50)  # one round: as measured


def test_benchmark_checks_every_model_first(trained_model, data_dir, tmp_path, capsys):
    assert main(["benchmark", str(trained_model[0]), str(tmp_path / "nothing"), "--data", str(data_dir)]) == 2
    assert "no model found" in error_line(capsys)


def test_train_refuses_a_ct2_dir_as_teacher_in_one_line(exports, data_dir, tmp_path, capsys):
    config = tmp_path / "student.yaml"
    config.write_text(f"data_dir: {data_dir}\noutput_dir: {tmp_path / 'student'}\n"
                      f"model: {{encoder_layers: 1, decoder_layers: 1, d_model: 64, ffn_dim: 128, heads: 4, "
                      f"max_length: 64}}\ndistill: {{teacher: {exports['int8']}}}\n")
    assert main(["train", str(config)]) == 2
    assert "is a CTranslate2 export" in error_line(capsys)
    assert not (tmp_path / "student" / "model.safetensors").exists()


@pytest.mark.parametrize("arch", ["post-ln", "pre-ln"])
def test_both_architectures_convert_to_the_same_greedy_tokens(arch, data_dir, tmp_path):
    """Untrained models (Marian for post-ln, Pegasus for pre-ln): the converted greedy tokens are HF's."""
    import torch

    from combinekd.config import ModelConfig
    from combinekd.data import load_tokenizer
    from combinekd.engines import load_translator
    from combinekd.export import export_model
    from combinekd.models import build_model, save_model_dir

    tokenizer = load_tokenizer(data_dir)
    torch.manual_seed(1)
    model = build_model(ModelConfig(arch=arch, encoder_layers=1, decoder_layers=1, d_model=32, ffn_dim=64, heads=2,
                                    max_length=64), tokenizer)
    with torch.no_grad():  # a spread of logits, so that greedy output is not one repeated token
        model.get_input_embeddings().weight.normal_(0, 1)
        model.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()  # as training keeps it
    save_model_dir(model, tokenizer, tmp_path / "hf")
    export_model(tmp_path / "hf", tmp_path / "ct2", quantization="float32")
    hf, ct2 = load_translator(tmp_path / "hf"), load_translator(tmp_path / "ct2")
    for sentence in SENTENCES:
        enc = tokenizer([sentence], return_tensors="pt")
        with torch.no_grad():
            out = hf.model.generate(**enc, num_beams=1, do_sample=False, max_length=12, bad_words_ids=None,
                                    forced_eos_token_id=None)
        hf_tokens = [t for t in tokenizer.convert_ids_to_tokens(out[0][1:]) if t != tokenizer.eos_token]
        result = ct2.translator.translate_batch([tokenizer.convert_ids_to_tokens(enc["input_ids"][0])],
                                                beam_size=1, max_decoding_length=11)
        assert result[0].hypotheses[0] == hf_tokens, (arch, sentence)


def test_sequence_kd_data_from_a_ct2_teacher(exports, trained_model, data_dir, tmp_path, capsys):
    """distill-data decodes through the engines: a CTranslate2 export of the teacher gives its greedy targets
    (CT2 float32 greedy equals transformers' greedy, above), and its record names the engine."""
    from combinekd.data import read_meta

    targets = {}
    for name, teacher in (("transformers", trained_model[0]), ("ctranslate2", exports["float32"])):
        out = tmp_path / name
        assert main(["distill-data", str(teacher), "--data", str(data_dir), "--out", str(out), "--beam", "1"]) == 0
        assert read_meta(out)["seqkd"]["engine"] == name and read_meta(out)["seqkd"]["precision"] == "float32"
        targets[name] = (out / "train.tgt").read_text().splitlines()
    same = sum(a == b for a, b in zip(targets["transformers"], targets["ctranslate2"]))
    assert len(targets["ctranslate2"]) == len(targets["transformers"]) and same >= 0.98 * len(targets["transformers"])
    capsys.readouterr()
    assert main(["distill-data", str(exports["int8"]), "--data", str(data_dir), "--out", str(tmp_path / "bf16"),
                 "--dtype", "bfloat16"]) == 2
    assert "chosen when it was exported" in capsys.readouterr().err and not (tmp_path / "bf16").exists()
