"""The training objective: a student, an optional frozen teacher, the layer mapping M, the combiners and
the loss terms, put together into the one loss the trainer minimises::

    L = w_hard * CE_ls(S, gold) + w_soft * T^2 * KL(p_T || p_S)
        + w_layer * sum_side sum_i LayerLoss(h_S^i, Combine_i({h_T^j : j in M(i)}))
        + w_attn * sum_side sum_i AttnLoss(A_S^i, mean_{j in M(i)} A_T^j)

Without a teacher it is plain label-smoothed cross-entropy training.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from combinekd.combiners import build_combiner
from combinekd.config import Config, InitConfig, SideConfig
from combinekd.errors import UserError, warn
from combinekd.losses import Logits, attention_loss, layer_loss, masked_mean, maybe_compiled, vocab_losses
from combinekd.mapping import Groups, describe, layer_groups, random_groups

SIDES = ("encoder", "decoder")


def num_layers(model_config: Any, side: str) -> int:
    """Encoder or decoder depth of a HF seq2seq config (Marian/BART style, or T5 style)."""
    for key in (f"{side}_layers", "num_layers" if side == "encoder" else "num_decoder_layers"):
        if getattr(model_config, key, None):
            return int(getattr(model_config, key))
    raise UserError(f"cannot tell the {side} depth of a `{model_config.model_type}` model")


class Objective(nn.Module):
    """Student + frozen teacher + combiners -> one loss per batch (normalised per token).

    The teacher is deliberately *not* a registered submodule: it is never optimised, saved in
    checkpoints or synchronised by DDP, and stays in eval mode."""

    def __init__(self, student: nn.Module, cfg: Config, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self.label_smoothing = cfg.train.label_smoothing
        self.compile_loss = cfg.train.compile_loss
        d = cfg.distill
        self.w_hard = d.w_hard if d else 1.0
        self.w_soft = d.w_soft if d and teacher is not None else 0.0
        self.w_layer = d.w_layer if d and teacher is not None else 0.0
        self.w_attn = d.w_attn if d and teacher is not None else 0.0
        self.temperature = d.temperature if d else 1.0
        self.sides: dict[str, tuple[SideConfig, Groups]] = {}
        self.combiners = nn.ModuleDict()
        self._taps: dict[str, LayerTaps] = {}
        self._teacher_seconds = 0.0  # host time in teacher forwards since the last pop_teacher_seconds()
        self.collect_stats = True  # per-layer diagnostics in the output (the trainer asks only when it logs)
        if teacher is None or (self.w_layer == 0 and self.w_attn == 0):
            return
        for side in SIDES:
            side_cfg: SideConfig | None = getattr(d, side)
            if side_cfg is None:
                continue
            t_layers, s_layers = num_layers(teacher.config, side), num_layers(student.config, side)
            groups = layer_groups(side_cfg.strategy, t_layers, s_layers, side_cfg.groups)
            sizes = [1] * len(groups) if side_cfg.strategy == "random" else [len(g) for g in groups]
            self.sides[side] = (side_cfg, groups)
            if self.w_layer > 0:  # no unused parameters (DDP would reject them)
                self.combiners[side] = nn.ModuleList(
                    build_combiner(side_cfg.combiner, k, teacher.config.d_model, student.config.d_model)
                    for k in sizes)
                wanted = set(range(1, t_layers + 1)) if side_cfg.strategy == "random" else set().union(*groups)
                self._taps[f"teacher_{side}"] = LayerTaps(layer_stack(teacher, side), wanted)
                self._taps[f"student_{side}"] = LayerTaps(layer_stack(student, side), set(range(1, s_layers + 1)))

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .float() also move the unregistered teacher
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def pop_teacher_seconds(self) -> float:
        """Seconds spent in teacher forward passes since the last call (for the run's time split)."""
        seconds, self._teacher_seconds = self._teacher_seconds, 0.0
        return seconds

    def describe(self) -> list[str]:
        """Human-readable summary of the objective, for the training log."""
        if self.teacher is None:
            return [f"objective: label-smoothed cross-entropy (eps {self.label_smoothing})"]
        lines = [f"objective: {self.w_hard} * hard + {self.w_soft} * soft (T={self.temperature}) + "
                 f"{self.w_layer} * layer + {self.w_attn} * attention"]
        for side, (side_cfg, groups) in self.sides.items():
            lines.append(f"{describe(side_cfg.strategy, groups, side)} [combiner {side_cfg.combiner}, "
                         f"loss {side_cfg.loss}]")
        return lines

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss": weighted sum, "hard"/"soft"/"layer_SIDE"/"attn_SIDE": the terms,
        "SIDEi/...": per-student-layer diagnostics}`` for one batch."""
        labels, mask_src = batch["labels"], batch["attention_mask"].bool()
        mask_tgt = labels != -100
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "decoder_input_ids": decoder_input_ids(self.student, labels),
                  "output_attentions": bool(self.sides) and self.w_attn > 0}
        out_s, logits_s = forward_to_logits(self.student, inputs)
        out_t = logits_t = None
        if self.teacher is not None:
            start = time.perf_counter()
            with torch.no_grad():  # the teacher's decoder starts from its own start token (BART: eos)
                out_t, logits_t = forward_to_logits(
                    self.teacher, {**inputs, "decoder_input_ids": decoder_input_ids(self.teacher, labels)})
            self._teacher_seconds += time.perf_counter() - start
        compiled = self.compile_loss is True or (self.compile_loss == "auto" and labels.device.type == "cpu")
        # w_hard * hard + w_soft * soft, with the gradient; hard and soft themselves are values for the log
        vocab, hard, soft = vocab_losses(logits_s, logits_t if self.w_soft else None, labels, self.label_smoothing,
                                         self.temperature, self.w_hard, self.w_soft, compiled=compiled)
        parts = {"hard": hard, **({"soft": soft} if self.w_soft else {})}
        stats: dict[str, torch.Tensor] = {}  # logged, not optimised
        if out_t is not None:
            masks = {"encoder": mask_src, "decoder": mask_tgt}
            for side, (side_cfg, groups) in self.sides.items():
                if side_cfg.strategy == "random":
                    groups = random_groups(len(groups[0]), len(groups), _TorchRandom())
                if side in self.combiners:
                    h_s, h_t = self._taps[f"student_{side}"].pop(), self._taps[f"teacher_{side}"].pop()
                    per_layer = []
                    for i, (group, combine) in enumerate(zip(groups, self.combiners[side]), 1):
                        teachers = [h_t[j] for j in group]
                        per_layer.append(maybe_compiled(combined_layer_loss, compiled, combine, h_s[i], teachers,
                                                        masks[side], side_cfg.loss))
                        if self.collect_stats:
                            with torch.no_grad():  # the compared pair again, for the diagnostics only
                                compared = combine(h_s[i], teachers)
                            stats.update(_layer_stats(f"{side}{i}", per_layer[-1], h_s[i], compared, combine,
                                                      masks[side], side_cfg.loss))
                    parts[f"layer_{side}"] = sum(per_layer)
                if inputs["output_attentions"]:
                    a_s, a_t = getattr(out_s, f"{side}_attentions"), getattr(out_t, f"{side}_attentions")
                    parts[f"attn_{side}"] = sum(
                        attention_loss(a_s[i - 1], torch.stack([a_t[j - 1] for j in group]).mean(0), masks[side])
                        for i, group in enumerate(groups, 1))
        weights = {"layer": self.w_layer, "attn": self.w_attn}
        parts["loss"] = vocab + sum(weights[name.split("_")[0]] * value for name, value in parts.items()
                                    if name not in ("hard", "soft"))
        return {**parts, **stats}


class LayerTaps:
    """The outputs of chosen layers (1-based) of one layer stack, kept by forward hooks.

    Every architecture's layer output is the residual stream before any final layer norm, so
    h^i means the same thing for pre-LN and post-LN models, and only the mapped layers are kept."""

    def __init__(self, layers: nn.ModuleList, wanted: set[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        for j in sorted(wanted):
            layers[j - 1].register_forward_hook(self._keep(j))

    def _keep(self, j: int):
        def hook(module, args, output):
            self.outputs[j] = output[0] if isinstance(output, tuple) else output
        return hook

    def pop(self) -> dict[int, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs


# families whose logits are lm_head(decoder states) (+ final_logits_bias), lm_head linear without bias
LINEAR_OUTPUT = {"marian", "pegasus", "bart", "mbart", "m2m_100"}


def forward_to_logits(model: nn.Module, inputs: dict) -> tuple[Any, Logits]:
    """Run a HF seq2seq model up to its output layer: ``(outputs, logits)``, the logits as the decoder's
    last states and the output layer, which the loss applies a chunk at a time (``losses.Logits``).
    Families not in LINEAR_OUTPUT (T5 rescales before its head) run whole and hand over their logits."""
    head = model.get_output_embeddings()
    if model.config.model_type not in LINEAR_OUTPUT or not isinstance(head, nn.Linear) or head.bias is not None:
        out = model(**inputs)
        return out, Logits(out.logits)
    out = model.base_model(**inputs)
    device = out.last_hidden_state.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return out, Logits(out.last_hidden_state, head.weight, getattr(model, "final_logits_bias", None), dtype)


def decoder_input_ids(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs a model expects for ``labels``: the labels shifted right behind the model's
    own decoder start token (its ``prepare_decoder_input_ids_from_labels``, e.g. mBART's language
    code; M2M100 has none: its config's start token)."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    from transformers.models.bart.modeling_bart import shift_tokens_right

    return shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)


def layer_stack(model: nn.Module, side: str) -> nn.ModuleList:
    """The encoder's or decoder's list of layers of a HF seq2seq model (``.layers``; T5: ``.block``)."""
    stack = model.get_encoder() if side == "encoder" else model.get_decoder()
    for name in ("layers", "block"):
        if isinstance(getattr(stack, name, None), nn.ModuleList):
            return getattr(stack, name)
    raise UserError(f"cannot find the {side} layers of a `{model.config.model_type}` model")


def combined_layer_loss(combine: nn.Module, student: torch.Tensor, teachers: list[torch.Tensor], mask: torch.Tensor,
                        kind: str) -> torch.Tensor:
    """LayerLoss(h_S^i, Combine_i({h_T^j : j in M(i)})) for one student layer (``combine``: its combiner)."""
    return layer_loss(*combine(student, teachers), mask, kind)


@torch.no_grad()
def _layer_stats(name: str, loss: torch.Tensor, student: torch.Tensor, compared: tuple[torch.Tensor, torch.Tensor],
                 combiner: nn.Module, mask: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """What makes a collapsing or trivially met layer loss visible in the log, for one student layer:
    its layer loss; ``baseline``, the loss of a student that outputs one vector at every position (the
    batch's mean target), so a loss not clearly below it has learnt nothing position-specific; the
    RMS of the student's hidden states and of the target; the combiner's weight norm."""
    def rms(x: torch.Tensor) -> torch.Tensor:
        return masked_mean(x.float().pow(2).mean(-1), mask).sqrt()

    target = compared[1].float()
    weight = mask.to(target.dtype).unsqueeze(-1)
    mean_target = (target * weight).sum((0, 1)) / weight.sum().clamp(min=1)
    weights = [p.float().norm() for p in combiner.parameters()]
    return {f"{name}/layer_loss": loss.detach(),
            f"{name}/baseline": layer_loss(mean_target.expand_as(target), target, mask, kind),
            f"{name}/rms_student": rms(student), f"{name}/rms_target": rms(target),
            f"{name}/combiner_norm": torch.stack(weights).norm() if weights else torch.zeros(())}


class _TorchRandom:
    """``random.sample`` on torch's global generator, so RAIL-KD draws resume exactly with the run."""

    @staticmethod
    def sample(population: range, k: int) -> list[int]:
        return [population[i] for i in torch.randperm(len(population))[:k].tolist()]


def init_from_teacher(student: nn.Module, teacher: nn.Module, init: InitConfig) -> None:
    """Copy the shared embeddings and the chosen teacher layers (1-based) into the student.

    The teacher's layers must have the student's parameters: Marian, BART, mBART, M2M100 and
    Pegasus layers do; T5 blocks do not and are refused."""
    chosen = {side: getattr(init, side) for side in SIDES if getattr(init, side)}
    for side, layers in chosen.items():
        s_layers, t_layers = layer_stack(student, side), layer_stack(teacher, side)
        if len(layers) != len(s_layers) or not all(1 <= j <= len(t_layers) for j in layers):
            raise UserError(f"init_from_teacher.{side}: give {len(s_layers)} teacher layers within "
                            f"1..{len(t_layers)}, got {layers}")
        _check_same_parameters(s_layers[0], t_layers[0], teacher.config.model_type, side)
    t_norm, s_norm = (LAYER_NORM_PLACEMENT.get(m.config.model_type) for m in (teacher, student))
    if chosen and t_norm and s_norm and t_norm != s_norm:
        warn(f"init_from_teacher: the `{teacher.config.model_type}` teacher's layers are {t_norm} but the "
             f"student's are {s_norm}: the copied weights start in another layout "
             f"(model.arch: {t_norm.lower()} matches the teacher)")
    try:
        student.get_input_embeddings().load_state_dict(teacher.get_input_embeddings().state_dict())
        for side, layers in chosen.items():
            s_layers, t_layers = layer_stack(student, side), layer_stack(teacher, side)
            for s_layer, j in zip(s_layers, layers):
                s_layer.load_state_dict(t_layers[j - 1].state_dict())
    except RuntimeError as exc:
        raise UserError(f"init_from_teacher needs the teacher's width, ffn and heads: "
                        f"{str(exc).splitlines()[0]}") from None


# where each family's layers put their layer norms (the student is Marian post-LN or Pegasus pre-LN)
LAYER_NORM_PLACEMENT = {"marian": "post-LN", "bart": "post-LN", "mbart": "pre-LN", "m2m_100": "pre-LN",
                        "pegasus": "pre-LN"}


def _check_same_parameters(s_layer: nn.Module, t_layer: nn.Module, teacher_type: str, side: str) -> None:
    """Refuse to copy a teacher layer whose parameters are not the student's (a T5 block into a
    Pegasus layer): no mapping of names makes those the same computation."""
    s_names, t_names = set(s_layer.state_dict()), set(t_layer.state_dict())
    if s_names != t_names:
        example = sorted(t_names - s_names)[0] if t_names - s_names else sorted(s_names - t_names)[0]
        raise UserError(f"init_from_teacher: the `{teacher_type}` teacher's {side} layers ({type(t_layer).__name__}, "
                        f"with `{example}`) have other parameters than the student's ({type(s_layer).__name__}); "
                        f"layers can be copied from Marian, BART, mBART, M2M100 or Pegasus teachers only: "
                        f"drop init_from_teacher for this teacher")


def build_objective(cfg: Config, tokenizer) -> Objective:
    """The objective for a config: plain CE training, or KD from ``cfg.distill.teacher``."""
    from combinekd.models import build_model, check_same_vocabulary, load_model_dir, preferred_attention, use_bf16

    attention = preferred_attention(attention_maps=bool(cfg.distill and cfg.distill.w_attn > 0))
    student = build_model(cfg.model, tokenizer, attn_implementation=attention)
    if cfg.distill is None:
        return Objective(student, cfg)
    teacher, teacher_tokenizer = load_model_dir(cfg.distill.teacher, attn_implementation=attention)
    check_same_vocabulary(teacher_tokenizer, tokenizer, f"the teacher {cfg.distill.teacher}",
                          f"the data in {cfg.data_dir}")
    teacher.eval().requires_grad_(False)
    if teacher.get_output_embeddings().out_features != student.get_output_embeddings().out_features:
        raise UserError(f"the teacher {cfg.distill.teacher} predicts {teacher.get_output_embeddings().out_features} "
                        f"tokens but the student's vocabulary has {len(tokenizer)}")
    if cfg.distill.init_from_teacher:
        init_from_teacher(student, teacher, cfg.distill.init_from_teacher)
    if use_bf16(cfg.distill.teacher_bf16):  # bf16 weights: no autocast round trips on every forward
        teacher.to(torch.bfloat16)
    return Objective(student, cfg, teacher)
