"""Distillation: zero loss for an identical student, gradient flow, every strategy x combiner,
resume with combiners, vocabulary checks, teacher-initialised students and sequence-level KD."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from combinekd.cli import main
from combinekd.config import STRATEGIES, ModelConfig
from combinekd.data import collate, load_split, load_tokenizer, read_meta
from combinekd.distill import Objective, build_objective, combined_layer_loss
from combinekd.errors import UserError
from combinekd.models import build_model, save_model_dir
from combinekd.trainer import train

from conftest import prepare_corpus, save_random_model, tiny_config, write_corpus

COMBINER_NAMES = ("linear", "student-up", "attention", "mean")


@pytest.fixture(scope="session")
def teacher_dir(data_dir, tmp_path_factory):
    """A 4+4-layer teacher of width 96 (random weights), saved like any local HF model dir."""
    return save_random_model(data_dir, tmp_path_factory.mktemp("kd") / "teacher", seed=1, encoder_layers=4,
                             decoder_layers=4, d_model=96, ffn_dim=128, heads=4)


def kd_config(data_dir, out, teacher, **sets):
    base = {"distill.teacher": str(teacher), "distill.encoder.strategy": "overlap"}
    return tiny_config(data_dir, out, **{**base, **sets})


def batch(data_dir, n=6):
    tokenizer = load_tokenizer(data_dir)
    return collate(load_split(data_dir, "train"), list(range(n)), tokenizer.pad_token_id)


def test_identical_student_has_zero_layer_and_soft_loss(data_dir, tmp_path):
    tokenizer = load_tokenizer(data_dir)
    torch.manual_seed(0)
    same = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=64, ffn_dim=128, heads=4, dropout=0.0,
                       max_length=64)
    teacher = build_model(same, tokenizer)
    save_model_dir(teacher, tokenizer, tmp_path / "twin")
    cfg = kd_config(data_dir, tmp_path / "o", tmp_path / "twin", **{
        "model.dropout": 0.0, "distill.encoder.strategy": "skip", "distill.decoder.strategy": "skip",
        "distill.teacher_bf16": False})
    objective = build_objective(cfg, tokenizer)
    objective.student.load_state_dict(teacher.state_dict())
    parts = objective(batch(data_dir))
    assert parts["layer_encoder"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["layer_decoder"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["soft"].item() == pytest.approx(0.0, abs=1e-5)
    assert sum(p.numel() for p in objective.combiners.parameters()) == 0, "skip with equal widths: no projection"
    # the per-layer diagnostics: a student that matches its teacher is far below the know-nothing baseline
    for side in ("encoder", "decoder"):
        for i in (1, 2):
            assert parts[f"{side}{i}/layer_loss"].item() == pytest.approx(0.0, abs=1e-6)
            assert parts[f"{side}{i}/baseline"].item() > 0.2
            assert parts[f"{side}{i}/rms_target"].item() == pytest.approx(1.0, abs=1e-3)  # N(teacher)
            assert parts[f"{side}{i}/combiner_norm"].item() == 0.0


def test_attention_is_eager_on_cpu_sdpa_on_gpu_unless_maps_are_needed(data_dir, teacher_dir, tmp_path, monkeypatch):
    """bench/attention.py: SDPA's CPU kernel trains and decodes slower than eager attention; on a GPU
    SDPA, unless the attention loss needs the maps. Student, teacher and loaded models alike."""
    from combinekd.models import load_model_dir, preferred_attention

    objective = build_objective(kd_config(data_dir, tmp_path / "o", teacher_dir), load_tokenizer(data_dir))
    assert {m.config._attn_implementation for m in (objective.student, objective.teacher)} == {"eager"}
    assert load_model_dir(teacher_dir)[0].config._attn_implementation == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preferred_attention() == "sdpa" and preferred_attention(attention_maps=True) == "eager"


def test_gradients_reach_student_and_combiners_never_teacher(data_dir, teacher_dir, tmp_path):
    cfg = kd_config(data_dir, tmp_path / "o", teacher_dir, **{"distill.decoder.strategy": "regular"})
    objective = build_objective(cfg, load_tokenizer(data_dir))
    objective(batch(data_dir))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.combiners.parameters())
    assert objective.student.get_encoder().layers[0].fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())
    assert not any(name.startswith("teacher") for name in objective.state_dict())
    assert not objective.teacher.training


@pytest.mark.parametrize("combiner", COMBINER_NAMES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_and_combiner_trains_on_both_sides(data_dir, teacher_dir, tmp_path, strategy, combiner):
    sets = {}
    for side in ("encoder", "decoder"):
        sets[f"distill.{side}.strategy"] = strategy
        sets[f"distill.{side}.combiner"] = combiner
        if strategy == "groups":
            sets[f"distill.{side}.groups"] = "[[1,2],[2,3,4]]"
    objective = build_objective(kd_config(data_dir, tmp_path / "o", teacher_dir, **sets), load_tokenizer(data_dir))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        parts = objective(batch(data_dir))
        parts["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(parts["loss"].item())
        assert {"hard", "soft", "layer_encoder", "layer_decoder"} <= parts.keys()
    assert all(torch.isfinite(torch.tensor(losses)))


def test_attention_map_kd(data_dir, teacher_dir, tmp_path):
    cfg = kd_config(data_dir, tmp_path / "o", teacher_dir, **{"distill.w_attn": 1.0, "distill.decoder.strategy": "skip"})
    parts = build_objective(cfg, load_tokenizer(data_dir))(batch(data_dir))
    assert parts["attn_encoder"].item() > 0 and parts["attn_decoder"].item() > 0
    parts["loss"].backward()


def test_resume_with_combiners_is_exact(data_dir, teacher_dir, tmp_path):
    sets = {"distill.decoder.strategy": "random", "distill.decoder.combiner": "linear"}
    train(kd_config(data_dir, tmp_path / "a", teacher_dir, **sets, **{"train.max_steps": 8, "train.eval_every": 4}))
    train(kd_config(data_dir, tmp_path / "b", teacher_dir, **sets, **{"train.max_steps": 4, "train.eval_every": 4}))
    train(kd_config(data_dir, tmp_path / "b", teacher_dir, **sets, **{"train.max_steps": 8, "train.eval_every": 4}),
          resume=True)
    a = load_file(str(tmp_path / "a/checkpoints/last/objective.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/last/objective.safetensors"))
    assert any(k.startswith("combiners.encoder") for k in a) and any(k.startswith("combiners.decoder") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_vocabulary_mismatch_and_missing_teacher_are_user_errors(data_dir, teacher_dir, tmp_path, capsys):
    other = prepare_corpus(write_corpus(tmp_path / "c", {"train": 300, "dev": 10, "test": 10}), tmp_path / "d2",
                           tokenizer_from=None)
    # a different SentencePiece model: the same text gives different ids
    (tmp_path / "c" / "train.xx").write_text("".join(f"w{i % 16}{i % 7} z\n" for i in range(300)))
    other = prepare_corpus(tmp_path / "c", tmp_path / "d3")
    config = tmp_path / "kd.yaml"
    config.write_text(f"data_dir: {other}\noutput_dir: {tmp_path / 'o'}\ndistill:\n  teacher: {teacher_dir}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "vocabulary mismatch" in err and "--tokenizer-from" in err and len(err.strip().splitlines()) == 1
    config.write_text(f"data_dir: {data_dir}\noutput_dir: {tmp_path / 'o'}\ndistill:\n  teacher: {tmp_path / 'no'}\n")
    assert main(["train", str(config)]) == 2
    assert "no model found" in capsys.readouterr().err


def test_prepare_with_the_teachers_tokenizer(corpus, teacher_dir, tmp_path):
    data = prepare_corpus(corpus, tmp_path / "data", tokenizer_from=teacher_dir)
    assert read_meta(data)["tokenizer_from"] == str(teacher_dir)
    cfg = kd_config(data, tmp_path / "student", teacher_dir, **{"train.max_steps": 2, "train.eval_every": 2})
    summary = train(cfg)
    assert summary["steps"] == 2
    assert summary["wall_seconds"]["of_which_teacher_forward"] > 0


def test_init_from_teacher_copies_layers(data_dir, teacher_dir, tmp_path):
    cfg = kd_config(data_dir, tmp_path / "o", teacher_dir, **{
        "model.d_model": 96, "distill.init_from_teacher.encoder": "[2, 4]", "distill.init_from_teacher.decoder": "[1, 4]",
        "distill.teacher_bf16": True})
    objective = build_objective(cfg, load_tokenizer(data_dir))
    s_enc, t_enc = objective.student.get_encoder().layers, objective.teacher.get_encoder().layers
    assert objective.teacher.dtype == torch.bfloat16, "the frozen teacher is held in bf16 (teacher_bf16)"
    assert torch.equal(s_enc[1].fc1.weight.bfloat16(), t_enc[3].fc1.weight)
    assert torch.equal(objective.student.get_decoder().layers[0].fc2.weight.bfloat16(),
                       objective.teacher.get_decoder().layers[0].fc2.weight)
    bad = kd_config(data_dir, tmp_path / "o", teacher_dir, **{"distill.init_from_teacher.encoder": "[1, 2]"})
    with pytest.raises(UserError, match="init_from_teacher needs the teacher's width"):
        build_objective(bad, load_tokenizer(data_dir))


def test_sequence_level_kd_data(trained_model, data_dir, tmp_path, capsys):
    teacher, _ = trained_model
    out = tmp_path / "seqkd"
    assert main(["distill-data", str(teacher), "--data", str(data_dir), "--out", str(out), "--beam", "2"]) == 0
    meta = read_meta(out)
    assert meta["seqkd"]["teacher"] == str(teacher)
    targets = (out / "train.tgt").read_text().splitlines()
    sources = (out / "train.src").read_text().splitlines()
    assert len(targets) == meta["splits"]["train"]["pairs"] == len(load_split(out, "train"))
    # the trained teacher translates word for word: most targets equal the dictionary translation
    exact = sum(t == s.replace("w", "v") for s, t in zip(sources, targets))
    assert exact > 0.5 * len(targets)
    assert (out / "dev.tgt").read_text() == (data_dir / "dev.tgt").read_text()
    assert not (tmp_path / ".seqkd.partial.tgt").exists()


def _reference_vocab_losses(s, t, labels, eps, temperature):
    """The two terms written with PyTorch's own functions (autograd through full-vocabulary tensors)."""
    import torch.nn.functional as F

    hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=-100, label_smoothing=eps)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="none").sum(-1)
    return hard, kl[labels != -100].mean() * temperature ** 2


@pytest.mark.parametrize("eps,temperature", [(0.0, 1.0), (0.1, 1.0), (0.1, 2.0)])
def test_vocab_losses_match_pytorch_in_value_and_gradient(eps, temperature):
    """The fused hard/soft loss equals label-smoothed cross-entropy and T^2 KL(teacher || student) over
    the non-pad tokens, and so do the gradients (for any weights of the two terms)."""
    from combinekd.losses import Logits, vocab_losses

    torch.manual_seed(0)
    t = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:], labels[2, 1:] = -100, -100
    s1 = torch.randn(3, 5, 11, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    loss, hard, soft = vocab_losses(Logits(s1), Logits(t), labels, eps, temperature, w_hard=0.3, w_soft=0.7)
    (2 * loss).backward()
    ref_hard, ref_soft = _reference_vocab_losses(s2, t, labels, eps, temperature)
    (2 * (0.3 * ref_hard + 0.7 * ref_soft)).backward()
    assert not hard.requires_grad and not soft.requires_grad
    assert loss.item() == pytest.approx(0.3 * ref_hard.item() + 0.7 * ref_soft.item(), rel=1e-5)
    assert hard.item() == pytest.approx(ref_hard.item(), rel=1e-5)
    assert soft.item() == pytest.approx(ref_soft.item(), rel=1e-5)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)
    assert s1.grad[labels == -100].abs().sum() == 0


def test_vocab_losses_gradcheck_and_no_teacher():
    from combinekd.losses import Logits, vocab_losses

    torch.manual_seed(1)
    s = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100], [6, 0, -100, -100]])
    for temperature in (1.0, 2.0):
        assert torch.autograd.gradcheck(
            lambda x: vocab_losses(Logits(x), Logits(t), labels, 0.1, temperature, 0.4, 0.6)[0], (s,))
    assert torch.autograd.gradcheck(lambda x: vocab_losses(Logits(x), None, labels, 0.1, 1.0)[0], (s,))
    # through the output layer: gradients to the states and to W (bias a buffer), teacher as states too
    h = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b, h_t, w_t = (torch.randn(*shape, dtype=torch.float64) for shape in ((1, 7), (2, 4, 3), (7, 3)))
    assert torch.autograd.gradcheck(lambda x, y: vocab_losses(
        Logits(x, y, b), Logits(h_t, w_t), labels, 0.1, 2.0, 0.4, 0.6)[0], (h, w))
    loss, hard, soft = vocab_losses(Logits(s), None, labels, 0.1, w_soft=0.5)  # no teacher: no soft term
    assert soft.item() == 0.0 and loss.item() == hard.item()


def test_vocab_losses_take_bf16_logits_and_many_chunks(monkeypatch):
    """bf16 logits in (as under autocast), fp32 sums, a bf16 gradient; rows split over several chunks."""
    import combinekd.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk
    torch.manual_seed(2)
    s = torch.randn(4, 6, 50).to(torch.bfloat16).requires_grad_(True)
    t = torch.randn(4, 6, 50).to(torch.bfloat16)
    labels = torch.randint(0, 50, (4, 6))
    labels[1, 2:] = -100  # padding across a chunk boundary
    loss, hard, soft = losses.vocab_losses(losses.Logits(s), losses.Logits(t), labels, 0.1, 1.0, w_soft=1.0)
    loss.backward()
    s32 = s.detach().float().requires_grad_(True)
    ref_hard, ref_soft = _reference_vocab_losses(s32, t.float(), labels, 0.1, 1.0)
    (ref_hard + ref_soft).backward()
    assert hard.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert hard.item() == pytest.approx(ref_hard.item(), rel=1e-5)
    assert soft.item() == pytest.approx(ref_soft.item(), rel=1e-4)
    torch.testing.assert_close(s.grad.float(), s32.grad, rtol=2e-2, atol=1e-4)
    assert s.grad[labels == -100].abs().sum() == 0


@pytest.mark.parametrize("arch", ["pre-ln", "post-ln"])
def test_students_logits_as_states_and_output_layer(data_dir, arch):
    """combinekd's own students (Pegasus and Marian classes) hand the loss their output layer, and it
    computes their logits, under autocast too."""
    from combinekd.distill import decoder_input_ids, forward_to_logits

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder_layers=1, decoder_layers=1, d_model=32, ffn_dim=64, heads=4),
                        load_tokenizer(data_dir)).eval()
    model.final_logits_bias.normal_()
    b = batch(data_dir, 4)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
              "decoder_input_ids": decoder_input_ids(model, b["labels"])}
    for bf16 in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            _, logits = forward_to_logits(model, inputs)
            expected = model(**inputs).logits
        assert logits.weight is not None and logits.dtype == (torch.bfloat16 if bf16 else None)
        z = torch.nn.functional.linear(logits.hidden.to(logits.dtype or torch.float32), logits.weight.to(
            logits.dtype or torch.float32)).float() + logits.bias
        torch.testing.assert_close(z, expected.float())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_vocab_losses_apply_the_output_layer_a_chunk_at_a_time(monkeypatch, dtype):
    """Logits given as states and output layer (z = h W^T + b, in ``dtype`` as under autocast): the same
    loss and gradients (to h and W) as the full logits through autograd, over several chunks."""
    import combinekd.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 4 * 50)  # 4 rows a chunk
    torch.manual_seed(3)
    h = torch.randn(3, 6, 16, requires_grad=True)
    w = (torch.randn(50, 16) / 4).requires_grad_(True)
    b = torch.randn(1, 50)
    h_t, w_t = torch.randn(3, 6, 24), torch.randn(50, 24) / 5
    labels = torch.randint(0, 50, (3, 6))
    labels[0, 4:] = -100
    loss, hard, soft = losses.vocab_losses(losses.Logits(h, w, b, dtype), losses.Logits(h_t, w_t, None, dtype),
                                           labels, 0.1, 2.0, w_hard=0.6, w_soft=0.4)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype is not None):  # the model's own forward
        z, z_t = torch.nn.functional.linear(h2, w2) + b, torch.nn.functional.linear(h_t, w_t)
    ref_hard, ref_soft = _reference_vocab_losses(z.float(), z_t.float(), labels, 0.1, 2.0)
    (0.6 * ref_hard + 0.4 * ref_soft).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype is None else dict(rtol=2e-2, atol=2e-3)
    assert hard.item() == pytest.approx(ref_hard.item(), rel=tol["rtol"])
    assert soft.item() == pytest.approx(ref_soft.item(), rel=tol["rtol"])
    torch.testing.assert_close(h.grad, h2.grad, **tol)
    torch.testing.assert_close(w.grad, w2.grad, **tol)
    assert h.grad[labels == -100].abs().sum() == 0


@pytest.mark.parametrize("dtype,temperature", [(None, 2.0), (torch.bfloat16, 1.0)])
def test_compiled_vocab_losses_equal_the_eager_ones(monkeypatch, dtype, temperature):
    """``compiled=True`` (train.compile_loss) runs the same terms through torch.compile: the same values and
    gradients as the eager function, over several chunks with rows of padding."""
    import combinekd.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 5 * 50)  # 5 rows a chunk, the last one shorter
    torch.manual_seed(4)
    h, w = torch.randn(3, 7, 16), torch.randn(50, 16) / 4
    b, h_t, w_t, b_t = torch.randn(1, 50), torch.randn(3, 7, 24), torch.randn(50, 24) / 5, torch.randn(1, 50)
    labels = torch.randint(0, 50, (3, 7))
    labels[1, 3:] = -100
    results = []
    for compiled in (False, True):
        h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, hard, soft = losses.vocab_losses(losses.Logits(h1, w1, b, dtype), losses.Logits(h_t, w_t, b_t, dtype),
                                               labels, 0.1, temperature, 0.6, 0.4, compiled=compiled)
        loss.backward()
        results.append((loss.item(), hard.item(), soft.item(), h1.grad, w1.grad))
    assert losses.chunk_terms in losses._compiled and not losses._eager_only  # it compiled here, no fallback
    (loss0, hard0, soft0, gh0, gw0), (loss1, hard1, soft1, gh1, gw1) = results
    assert (loss1, hard1, soft1) == pytest.approx((loss0, hard0, soft0), rel=1e-5)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype is None else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gh1, gh0, **tol)
    torch.testing.assert_close(gw1, gw0, **tol)
    assert gh1[labels == -100].abs().sum() == 0


def test_loss_runs_eagerly_where_torch_compile_cannot_build(monkeypatch, capsys):
    """A machine where torch.compile fails (no C++ compiler): one warning, then the eager terms, same values."""
    import combinekd.losses as losses

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(losses, "_compiled", {losses.chunk_terms: broken})
    monkeypatch.setattr(losses, "_eager_only", False)
    torch.manual_seed(5)
    s, t = torch.randn(2, 4, 9, requires_grad=True), torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    first = losses.vocab_losses(losses.Logits(s), losses.Logits(t), labels, 0.1, 1.0, 0.5, 0.5, compiled=True)
    again = losses.vocab_losses(losses.Logits(s), losses.Logits(t), labels, 0.1, 1.0, 0.5, 0.5, compiled=True)
    eager = losses.vocab_losses(losses.Logits(s), losses.Logits(t), labels, 0.1, 1.0, 0.5, 0.5)
    assert first[0].item() == again[0].item() == eager[0].item()
    assert losses._eager_only  # and so is every compiled function from now on (the layer loss too)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "more detail" not in err
    assert "(InvalidCxxCompiler: No working C++ compiler found); it runs uncompiled" in err


@pytest.mark.parametrize("combiner", COMBINER_NAMES)
def test_compiled_layer_loss_equals_the_eager_one(data_dir, teacher_dir, tmp_path, combiner):
    """train.compile_loss also runs each student layer's combiner and layer loss through torch.compile: the
    same loss parts and the same gradients (student, combiners) as eagerly, the diagnostics included."""
    import combinekd.losses as losses

    results = []
    for compiled in (False, True):
        cfg = kd_config(data_dir, tmp_path / "o", teacher_dir, **{
            "model.dropout": 0.0, "distill.encoder.combiner": combiner, "distill.decoder.strategy": "regular",
            "distill.decoder.combiner": combiner, "train.compile_loss": compiled})
        torch.manual_seed(7)
        objective = build_objective(cfg, load_tokenizer(data_dir))
        parts = objective(batch(data_dir))
        parts["loss"].backward()
        results.append(({k: v.item() for k, v in parts.items()},
                        {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}))
    assert combined_layer_loss in losses._compiled and not losses._eager_only  # it compiled, no fallback
    (parts0, grads0), (parts1, grads1) = results
    assert parts1.keys() == parts0.keys() and {"layer_encoder", "layer_decoder", "encoder1/baseline"} <= parts0.keys()
    assert parts1 == pytest.approx(parts0, rel=1e-5, abs=1e-7)
    assert grads1.keys() == grads0.keys() and any(name.startswith("combiners") for name in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)


def test_layer_indices_are_one_based_layer_outputs(data_dir, teacher_dir, tmp_path):
    """A 1-layer student copied from teacher layer 1 reproduces it: zero loss for [[1]], not for [[2]]."""
    tokenizer = load_tokenizer(data_dir)

    def layer_loss_for(group: int) -> float:
        cfg = kd_config(data_dir, tmp_path / "o", teacher_dir, **{
            "model.d_model": 96, "model.encoder_layers": 1, "model.dropout": 0.0,
            "distill.teacher_bf16": False, "distill.encoder.strategy": "groups",
            "distill.encoder.groups": f"[[{group}]]", "distill.init_from_teacher.encoder": "[1]"})
        with torch.no_grad():
            return build_objective(cfg, tokenizer)(batch(data_dir))["layer_encoder"].item()

    assert layer_loss_for(1) == pytest.approx(0.0, abs=1e-6)
    assert layer_loss_for(2) > 1e-3


def test_prepare_refuses_to_replace_a_foreign_directory(corpus, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a data dir made by combinekd"):
        prepare_corpus(corpus, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_sequence_kd_resumes_after_a_cut_line(trained_model, data_dir, tmp_path, monkeypatch):
    from combinekd.data import split_text
    from combinekd.engines import HFTranslator
    from combinekd.seqkd import distill_data

    original, sources = HFTranslator.translate, split_text(data_dir, "train")[0]

    teacher, _ = trained_model
    out = tmp_path / "seqkd"
    full = distill_data(teacher, data_dir, out, beam=1)
    expected = (out / "train.tgt").read_text().splitlines()
    # simulate an interruption: a finished chunk plus half a line, with the job file in place
    partial, job = tmp_path / ".again.partial.tgt", tmp_path / ".again.partial.json"
    settings = {"teacher": str(teacher.resolve()), "data": str(data_dir.resolve()), "beam": 1, "precision": "float32",
                "train_bytes": (data_dir / "train.src").stat().st_size}
    job.write_text(json.dumps(settings))
    partial.write_text("\n".join(expected[:512]) + "\n" + expected[512][:3])
    translated = []
    monkeypatch.setattr(HFTranslator, "translate", lambda self, sentences, **kw: (
        translated.extend(sentences), original(self, sentences, **kw))[1])
    again = distill_data(teacher, data_dir, tmp_path / "again", beam=1)
    assert translated == sources[512:]  # only what the partial file did not hold
    assert again["pairs"] == full["pairs"]
    assert (tmp_path / "again" / "train.tgt").read_text().splitlines() == expected


def test_layer_diagnostics_are_logged_once_per_window_at_their_value(data_dir, teacher_dir, tmp_path):
    """The trainer asks for the per-layer diagnostics only on the last update of each log window; the
    logged value is that update's, not divided by the window's length (the target is normalised, so
    its RMS is 1), and the loss parts are still window means."""
    calls = []
    objective = build_objective(kd_config(data_dir, tmp_path / "o", teacher_dir), load_tokenizer(data_dir))
    forward = objective.forward
    objective.forward = lambda b: (calls.append(objective.collect_stats), forward(b))[1]
    train(kd_config(data_dir, tmp_path / "o", teacher_dir, **{"train.max_steps": 8, "train.log_every": 4,
                                                             "train.eval_every": 8}), objective=objective)
    assert calls == [False, False, False, True] * 2
    logged = [json.loads(line) for line in (tmp_path / "o/train_log.jsonl").read_text().splitlines()]
    windows = [e for e in logged if "hard" in e]
    assert [e["step"] for e in windows] == [4, 8]
    for entry in windows:
        assert entry["encoder1/rms_target"] == pytest.approx(1.0, abs=0.02)
        assert entry["encoder1/layer_loss"] > 0
