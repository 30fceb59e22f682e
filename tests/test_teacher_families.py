"""Teachers of the common transformers seq2seq families (Marian, BART, mBART, M2M100/NLLB, T5):
tiny random models built here with the data's tokenizer load, distil (CKD on both sides, word
KD, each teacher fed its own decoder start token), initialise a student or are refused, and decode."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from combinekd.cli import main
from combinekd.data import collate, load_split, load_tokenizer
from combinekd.distill import build_objective
from combinekd.errors import UserError
from combinekd.models import input_limit, load_model_dir, max_positions, save_model_dir

from conftest import tiny_config

FAMILIES = ("marian", "bart", "mbart", "m2m_100", "t5")


def tiny_teacher(family: str, tokenizer) -> torch.nn.Module:
    """A random 2+2-layer model of width 32 whose ids are the data tokenizer's. The decoder starts
    from each family's usual token: pad (Marian, T5), eos (BART, M2M100/NLLB), the last label (mBART)."""
    import transformers as tf

    pad, eos, vocab = tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)
    if family == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad))
    shape = dict(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 pad_token_id=pad, eos_token_id=eos, bos_token_id=None, forced_eos_token_id=eos)
    if family == "marian":
        return tf.MarianMTModel(tf.MarianConfig(decoder_vocab_size=vocab, decoder_start_token_id=pad, **shape))
    if family == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(decoder_start_token_id=eos, **shape))
    if family == "mbart":
        return tf.MBartForConditionalGeneration(tf.MBartConfig(**shape))
    return tf.M2M100ForConditionalGeneration(tf.M2M100Config(decoder_start_token_id=eos, **shape))


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory) -> dict[str, Path]:
    """A model dir per family, saved with the data's tokenizer (so the vocabulary check passes)."""
    root, dirs = tmp_path_factory.mktemp("families"), {}
    for family in FAMILIES:
        torch.manual_seed(0)
        tokenizer = load_tokenizer(data_dir)
        dirs[family] = root / family
        save_model_dir(tiny_teacher(family, tokenizer), tokenizer, dirs[family])
    return dirs


def batch(data_dir, n=4):
    return collate(load_split(data_dir, "train"), list(range(n)), load_tokenizer(data_dir).pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_with_an_attention_it_has(teachers, family):
    model, tokenizer = load_model_dir(teachers[family])
    assert model.config._attn_implementation == "eager"  # on CPU (models.preferred_attention); every class has it
    assert max_positions(model) == (None if family == "t5" else 64)  # T5: relative positions, no limit
    if model._supports_sdpa:  # (T5 before transformers 5 has no SDPA)
        assert load_model_dir(teachers[family], attn_implementation="sdpa")[0].config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_as_states_and_output_layer_equal_the_models_own(data_dir, teachers, family):
    """The KD loss applies each family's output layer itself (distill.forward_to_logits); what it
    applies equals the model's own logits (T5, which rescales first, hands over its logits)."""
    from combinekd.distill import LINEAR_OUTPUT, decoder_input_ids, forward_to_logits

    model = load_model_dir(teachers[family])[0].eval()
    if hasattr(model, "final_logits_bias"):  # zeros as initialised: make leaving it out visible
        model.final_logits_bias.normal_()
    b = batch(data_dir)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
              "decoder_input_ids": decoder_input_ids(model, b["labels"])}
    with torch.no_grad():
        _, logits = forward_to_logits(model, inputs)
        expected = model(**inputs).logits
    assert (logits.weight is not None) == (family in LINEAR_OUTPUT)
    z = logits.hidden if logits.weight is None else torch.nn.functional.linear(logits.hidden, logits.weight)
    torch.testing.assert_close(z + (0 if logits.bias is None else logits.bias), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_ckd_step_with_every_teacher_family(data_dir, teachers, tmp_path, family):
    """CKD (both teacher layers into one student layer) on both sides plus word KD: finite loss,
    gradients on the student only, and the teacher's decoder reads its own start token."""
    cfg = tiny_config(data_dir, tmp_path / "o", **{
        "distill.teacher": str(teachers[family]), "model.encoder_layers": 1, "model.decoder_layers": 1,
        "distill.encoder.strategy": "regular", "distill.decoder.strategy": "regular"})
    objective = build_objective(cfg, load_tokenizer(data_dir))
    seen = {}  # the decoder inputs each model is given
    for name, model in (("teacher", objective.teacher), ("student", objective.student)):
        model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen.update({name: kwargs["input_ids"]}), with_kwargs=True)
    parts = objective(batch(data_dir))
    parts["loss"].backward()
    assert {"hard", "soft", "layer_encoder", "layer_decoder"} <= parts.keys()
    assert torch.isfinite(parts["loss"]) and parts["layer_encoder"] > 0 and parts["layer_decoder"] > 0
    grads = [p.grad for p in objective.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert objective.student.get_encoder().layers[0].fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())
    tokenizer = load_tokenizer(data_dir)
    start = {"marian": tokenizer.pad_token_id, "t5": tokenizer.pad_token_id}.get(family, tokenizer.eos_token_id)
    assert (seen["student"][:, 0] == tokenizer.pad_token_id).all()
    assert (seen["teacher"][:, 0] == start).all(), "the teacher decodes from its own start token"
    assert torch.equal(seen["teacher"][:, 1:], seen["student"][:, 1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_init_from_teacher_copies_compatible_layers_and_refuses_t5(data_dir, teachers, tmp_path, family, capsys):
    arch = "post-ln" if family in ("marian", "bart") else "pre-ln"  # the student's layout matching the teacher's
    cfg = tiny_config(data_dir, tmp_path / "o", **{
        "distill.teacher": str(teachers[family]), "model.d_model": 32, "model.ffn_dim": 64, "model.arch": arch,
        "distill.teacher_bf16": False, "distill.init_from_teacher.encoder": "[2, 1]",
        "distill.init_from_teacher.decoder": "[1, 2]"})
    if family == "t5":
        with pytest.raises(UserError, match=r"`t5` teacher's encoder layers \(T5Block.*other parameters than the "
                                            r"student's \(PegasusEncoderLayer\).*drop init_from_teacher"):
            build_objective(cfg, load_tokenizer(data_dir))
        return
    objective = build_objective(cfg, load_tokenizer(data_dir))
    student, teacher = objective.student, objective.teacher
    assert torch.equal(student.get_encoder().layers[0].fc1.weight, teacher.get_encoder().layers[1].fc1.weight)
    assert torch.equal(student.get_decoder().layers[1].encoder_attn.q_proj.weight,
                       teacher.get_decoder().layers[1].encoder_attn.q_proj.weight)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert "warning" not in capsys.readouterr().err


def test_init_from_a_post_ln_teacher_into_a_pre_ln_student_warns(data_dir, teachers, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path / "o", **{
        "distill.teacher": str(teachers["marian"]), "model.d_model": 32, "model.ffn_dim": 64,
        "distill.init_from_teacher.encoder": "[1, 2]"})
    build_objective(cfg, load_tokenizer(data_dir))
    err = capsys.readouterr().err
    assert "`marian` teacher's layers are post-LN but the student's are pre-LN" in err
    assert "model.arch: post-ln" in err


def test_evaluate_and_translate_with_a_t5_model(data_dir, teachers, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hyps.txt"
    assert main(["evaluate", str(teachers["t5"]), "--data", str(data_dir), "--limit", "4", "--beam", "2",
                 "--out", str(out), "--json"]) == 0
    assert len(out.read_text().splitlines()) == 4
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3\nw4\n"))
    capsys.readouterr()
    assert main(["translate", str(teachers["t5"]), "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mbart"])  # mBART: no start token to decode from
def test_beam_search_that_skips_reordering_the_source_decodes_as_generate_alone(teachers, family, monkeypatch):
    """Each family decodes through SharedSourceCache (its reorder runs) and gives generate's own output."""
    from combinekd import evaluate

    model, tokenizer = load_model_dir(teachers[family])
    sentences = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w1", "w2 w2"]
    reorders = []
    reorder = evaluate.SharedSourceCache.reorder_cache
    monkeypatch.setattr(evaluate.SharedSourceCache, "reorder_cache",
                        lambda cache, beam_idx: (reorders.append(beam_idx), reorder(cache, beam_idx))[1])
    ours = evaluate.translate(model, tokenizer, sentences, beam=4, batch_size=3)
    assert len(reorders) > 3  # several steps of beam search went through it
    monkeypatch.setattr(evaluate, "beam_search_cache", lambda model, beam: {})
    assert evaluate.translate(model, tokenizer, sentences, beam=4, batch_size=3) == ours


def test_t5_reads_as_far_as_its_tokenizer_records_or_without_limit(teachers):
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    from combinekd.evaluate import too_long, translate

    model, tokenizer = load_model_dir(teachers["t5"])
    assert input_limit(model, tokenizer) == tokenizer.model_max_length == 512  # the data tokenizer's
    assert [i for i, _ in too_long(model, tokenizer, ["w1", "w1 " * 600])] == [1]
    tokenizer.model_max_length = VERY_LARGE_INTEGER  # a tokenizer that records no limit
    assert input_limit(model, tokenizer) is None and too_long(model, tokenizer, ["w1 " * 600]) == []
    assert len(translate(model, tokenizer, ["w1 w2", "w3"], beam=1)) == 2


def test_a_model_that_is_not_an_encoder_decoder_is_refused(data_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(data_dir)
    save_model_dir(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32)),
               tokenizer, tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"`gpt2` model, not an encoder-decoder.*Marian, BART/mBART, M2M100/NLLB"):
        load_model_dir(tmp_path / "gpt2")
