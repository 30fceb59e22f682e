"""Building, loading and saving Hugging Face seq2seq models together with their tokenizer."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from combinekd.config import ModelConfig
from combinekd.data import hub_hint, load_tokenizer, tokenizer_fingerprint
from combinekd.errors import UserError
from combinekd.files import atomic_dir


def _quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers in our output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def preferred_attention(attention_maps: bool = False) -> str:
    """The attention implementation combinekd trains and decodes with: ``sdpa`` on a GPU; ``eager``
    where attention maps are needed (the attention loss) and on CPU, where SDPA's CPU flash kernel is
    slower (bench/attention.py, 2 threads, bf16: a 2+2 d256 training step 0.92 s with SDPA, 0.81-0.85 s
    eager; 6+6 d256: 2.14-2.25 s, 1.73 s; greedy decoding of 160 dev sentences by the 6+6: 9.3-11.6 s,
    7.2-7.7 s, the pt-en teacher of the head-to-head at update 4,200)."""
    return "eager" if attention_maps or not torch.cuda.is_available() else "sdpa"


def _cpu_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.dropout`` for a CPU tensor in training: each element kept with probability 1 - p'
    and scaled by 1 / (1 - p'), where p' is p to the nearest 1/65,536 (0.1 -> 0.100006); every other case is
    torch's. The draw per element is 16 random bits, four from each 64-bit draw of torch's default generator
    (so a seeded run is reproducible and a resumed one exact). torch's CPU dropout draws its mask with
    ``bernoulli_``, about 14 ns an element: 5.9 ms for the mask of a 4,096 x 256 tensor on 2 threads, a uniform
    fp32 draw per element 3.1 ms, this 0.9 ms (results/speed-2026-12-07f.md); a 6+6 Transformer calls it 32
    times an update."""
    if not training or inplace or not 0.0 < p < 1.0 or input.device.type != "cpu":
        return _TORCH_DROPOUT(input, p, training, inplace)
    cut = round(p * 65536)  # drop where the 16 bits, read as 0..65535, are below cut
    if not 0 < cut < 65536:
        return _TORCH_DROPOUT(input, p, training, inplace)
    bits = torch.empty((input.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits
    lanes = bits.view(torch.int16)[:input.numel()].view(input.shape)  # uniform over -32768..32767
    keep = lanes >= cut - 32768
    return input * keep.to(input.dtype).mul_(65536 / (65536 - cut))


_TORCH_DROPOUT = F.dropout


@contextmanager
def fast_cpu_dropout():
    """While active, ``torch.nn.functional.dropout`` (what transformers' layers and ``nn.Dropout`` call) is
    :func:`_cpu_dropout` for CPU tensors: the training step runs its forward passes inside it."""
    F.dropout = _cpu_dropout
    try:
        yield
    finally:
        F.dropout = _TORCH_DROPOUT


def native_bf16(device: torch.device | str) -> bool | None:
    """Whether ``device`` computes in bf16 natively: a GPU that supports it, an x86 CPU with AVX-512 BF16 or
    AMX (True), an x86 CPU with neither, where PyTorch emulates bf16 (False), or not known (None: other CPU
    architectures, a torch without the checks)."""
    import platform

    import torch.cpu as cpu

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if None in checks:
        return None
    return any(check() for check in checks)


def slow_bf16_warning(device: torch.device | str) -> str | None:
    """Why bf16 may slow this run down, or None: on an x86 CPU without bf16 instructions (neither AVX-512
    BF16 nor AMX) PyTorch emulates bf16 and autocast is usually slower than fp32 (PyTorch's AMP notes;
    pytorch/pytorch#86550, #118499): a 6+6 d256 training update 120 s against 3.9 s in fp32 on an AVX2-only
    AMD EPYC, 2 threads (results/speed-2026-12-07b.md). With them it pays: combinekd's training step 2.1x fp32
    on an AVX-512 BF16 CPU (results/speed-2026-12-05.md), bf16 decoding 1.6-2.0x on AMX. Other CPU
    architectures: no opinion."""
    if torch.device(device).type != "cpu" or native_bf16(device) is not False:
        return None
    return "this CPU has neither AVX-512 BF16 nor AMX, so bf16 is emulated and usually slower than fp32 here"


def default_device() -> str:
    """Where combinekd runs a model when nothing says otherwise: the GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_bf16(setting: bool | str, device: torch.device | str | None = None) -> bool:
    """A bf16 switch of the config (``train.bf16``, ``distill.teacher_bf16``) for ``device`` (default: the GPU
    if there is one, else the CPU): true and false as they say; ``auto`` on only where bf16 is native
    (:func:`native_bf16`), so never the emulated path, and off where that is not known."""
    if setting != "auto":
        return bool(setting)
    return bool(native_bf16(device or default_device()))


def build_model(cfg: ModelConfig, tokenizer, attn_implementation: str = "sdpa"):
    """A randomly initialised encoder-decoder Transformer with tied, shared source/target embeddings.

    ``post-ln`` is transformers' Marian; ``pre-ln`` is transformers' Pegasus (Marian's layout with
    the layer norm before each sub-layer and a final layer norm per stack). Both start decoding
    from the pad token, as CTranslate2's converters expect."""
    from transformers import MarianConfig, MarianMTModel, PegasusConfig, PegasusForConditionalGeneration

    _quiet_transformers()
    pad = tokenizer.pad_token_id
    shape = dict(
        vocab_size=len(tokenizer), d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout, activation_function="swish",
        max_position_embeddings=cfg.max_length, scale_embedding=True, tie_word_embeddings=True,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=pad,
        forced_eos_token_id=tokenizer.eos_token_id)
    if cfg.arch == "pre-ln":
        model = PegasusForConditionalGeneration(PegasusConfig(**shape))
    else:
        model = MarianMTModel(MarianConfig(decoder_vocab_size=len(tokenizer),
                                           share_encoder_decoder_embeddings=True, **shape))
    # Vaswani et al. / fairseq initialisation for training from scratch: token embeddings with std
    # d^-0.5 (times the sqrt(d) embedding scale gives unit scale, like the sinusoidal positions; HF's
    # fine-tuning default of 0.02 drowns the tokens in the positions) and Xavier-uniform projections.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        embeddings = model.get_input_embeddings().weight
        embeddings.normal_(0.0, cfg.d_model ** -0.5)
        embeddings[pad].zero_()
    model.config._attn_implementation = attn_implementation
    model.generation_config.max_length = cfg.max_length
    model.generation_config.num_beams = 5
    model.generation_config.bad_words_ids = [[pad]]
    # Ours, not derived from config.json: else transformers 4.x, given a dir saved by 5.x (whose config.json
    # keeps forced_eos_token_id), rebuilds it from config.json and decodes greedily up to 20 tokens
    model.generation_config._from_model_config = False
    return model


def load_model_dir(path: str | Path, attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` from a Hugging Face model directory (ours or e.g. OPUS-MT).

    Any transformers encoder-decoder (tested: Marian, BART, mBART, M2M100/NLLB, Pegasus, T5).
    ``attn_implementation`` None is eager on CPU (:func:`preferred_attention`) and transformers'
    default on a GPU (SDPA where the architecture has it); "eager" when attention maps are needed.

    Strict: the weights must be safetensors (a pickle checkpoint can run code when loaded) and
    must be exactly the tensors the config describes; anything else is refused rather than
    silently filled with random weights."""
    from transformers import AutoModelForSeq2SeqLM

    _quiet_transformers()
    path = Path(path)
    check_model_dir(path)
    tokenizer = load_tokenizer(path)  # first: a dir without one fails before the weights are read
    weights = _weights_file(path)
    _check_seq2seq(path)
    if attn_implementation is None and preferred_attention() == "eager":
        attn_implementation = "eager"  # on a GPU: transformers' default, SDPA where the class has it (T5 4.x: not)
    try:
        # ignore_mismatched_sizes: a weight of another shape is reported in `info` like a missing one
        # (and refused below), not raised with details that transformers 5 only logs
        model, info = AutoModelForSeq2SeqLM.from_pretrained(
            str(path), attn_implementation=attn_implementation, use_safetensors=True, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(exc).__name__)
        raise UserError(f"cannot load {weights} with {path / 'config.json'}: {detail}") from None
    problems = _loading_problems(info)
    if problems:
        raise UserError(f"{weights} does not match {path / 'config.json'}: {problems}")
    if torch.cuda.is_available():
        model.to("cuda")
    limit = max_positions(model)
    if limit:  # model dirs saved before the tokenizer recorded the model's limit
        tokenizer.model_max_length = min(tokenizer.model_max_length, limit)
    return model, tokenizer


def check_model_dir(path: str | Path) -> None:
    """Refuse a path that is not a Hugging Face model dir (with a hint when it looks like a Hub id)."""
    if (Path(path) / "model.bin").is_file() and (Path(path) / "combinekd_export.json").is_file():
        raise UserError(f"{path} is a CTranslate2 export, which only translates: give the Hugging Face model "
                        f"dir it was exported from (its combinekd_export.json names it)")
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"no model found at {path} (expected a Hugging Face model dir with config.json)"
                        f"{hub_hint(path)}")


def _check_seq2seq(path: Path) -> None:
    """Refuse a model dir whose architecture is not one of transformers' encoder-decoders."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    if type(config) not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        raise UserError(f"{path} holds a `{config.model_type}` model, not an encoder-decoder (seq2seq) one: "
                        f"teachers and models are encoder-decoders such as Marian, BART/mBART, M2M100/NLLB, "
                        f"Pegasus or T5")


def max_positions(model) -> int | None:
    """The longest input (tokens) the model's position embeddings cover; None for a model without
    such a limit (T5's relative positions)."""
    return getattr(model.config, "max_position_embeddings", None)


def input_limit(model, tokenizer) -> int | None:
    """The longest input (tokens) translate feeds the model: its position limit, else the limit its
    tokenizer records (a T5 tokenizer's 512), else None (no limit)."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER  # a tokenizer's "none recorded"

    limit = max_positions(model) or tokenizer.model_max_length
    return limit if limit and limit < VERY_LARGE_INTEGER else None


def _weights_file(path: Path) -> Path:
    """The safetensors weights of a model dir; pickle-only or missing weights are refused."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (path / name).is_file():
            return path / name
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            raise UserError(f"{path / name}: pickle checkpoints are not loaded (unpickling can run code); convert "
                            f"it to safetensors once: AutoModelForSeq2SeqLM.from_pretrained(DIR).save_pretrained(DIR)")
    raise UserError(f"no weights in {path} (expected model.safetensors)")


def _loading_problems(info: dict, shown: int = 3) -> str:
    """One line naming the weights that transformers would otherwise leave random or ignore."""
    kinds = {"missing_keys": "missing weights", "unexpected_keys": "unexpected weights",
             "mismatched_keys": "weights of another shape"}
    problems = []
    for key, label in kinds.items():
        names = [item[0] if isinstance(item, tuple) else item for item in info.get(key) or []]
        if names:
            more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
            problems.append(f"{len(names)} {label}: {', '.join(sorted(names)[:shown])}{more}")
    return "; ".join(problems)


def save_model_dir(model, tokenizer, path: str | Path) -> None:
    """Write a standard HF model dir (safetensors weights + tokenizer); its other files are kept.

    The files are staged and moved into place together (files.atomic_dir). The tokenizer's
    ``model_max_length`` is set to the model's position limit: the tokenizer then warns about longer
    inputs, and ``truncation=True`` (a tokenizer call's, or ``pipeline("translation")``'s on transformers 4.x)
    cuts them to fit."""
    if max_positions(model):
        tokenizer.model_max_length = max_positions(model)
    with atomic_dir(path, merge=True) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))


def check_same_vocabulary(tokenizer_a, tokenizer_b, what_a: str, what_b: str) -> None:
    """Distillation needs one vocabulary: refuse tokenizers that would disagree on ids."""
    a, b = tokenizer_fingerprint(tokenizer_a), tokenizer_fingerprint(tokenizer_b)
    if a != b:
        diff = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k] and k != "sample") or "token ids differ"
        raise UserError(f"vocabulary mismatch between {what_a} and {what_b} ({diff}); "
                        f"prepare the data with `combinekd prepare --tokenizer-from TEACHER_DIR`")


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
