"""Random-weight models of real models' shapes, built directly on the device.

Speed does not depend on what the weights say, so 7B-class figures need no download: the shapes come
from each model's published config.json, the weights from a seeded random generator on the device.
"""

from __future__ import annotations

import torch

from kiln.builder.device import describe_device
from kiln.builder.engine_file import EngineConfig, current_versions
from kiln.config import BuildConfig, ModelConfig, RopeConfig
from kiln.distributed.comm import SINGLE, TPGroup
from kiln.errors import KilnError
from kiln.models.llama import LlamaForCausalLM
from kiln.models.registry import create_model
from kiln.quant.methods import QuantConfig

SHAPES: dict[str, ModelConfig] = {
    "mistral-7b-v0.3": ModelConfig("MistralForCausalLM", 32768, 4096, 14336, 32, 32, 8, 128, 1e-5,
                                   RopeConfig(theta=1e6), 32768, eos_token_id=2),
    "llama-3.1-8b": ModelConfig("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5,
                                RopeConfig(5e5, "llama3", 8.0, 1.0, 4.0, 8192), 131072, eos_token_id=128001),
    "mistral-nemo-12b": ModelConfig("MistralForCausalLM", 131072, 5120, 14336, 40, 32, 8, 128, 1e-5,
                                    RopeConfig(theta=1e6), 131072, eos_token_id=2),
    "smollm2-135m": ModelConfig("LlamaForCausalLM", 49152, 576, 1536, 30, 9, 3, 64, 1e-5,
                                RopeConfig(theta=1e5), 8192, tie_word_embeddings=True, eos_token_id=2),
}


def check_split(name: str, tp_size: int) -> None:
    """A clear error when `name`'s heads do not split into `tp_size` ranks."""
    if name not in SHAPES:
        raise KilnError(f"--synthetic {name!r} is unknown: choose one of {', '.join(SHAPES)}")
    cfg = SHAPES[name]
    if cfg.num_heads % tp_size or (cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads):
        fits = [n for n in range(1, cfg.num_heads + 1) if not cfg.num_heads % n
                and not (cfg.num_kv_heads % n and n % cfg.num_kv_heads)]
        raise KilnError(f"--tp_size {tp_size} does not fit --synthetic {name}: its {cfg.num_heads} attention heads "
                        f"({cfg.num_kv_heads} KV heads) do not split into {tp_size} ranks; "
                        f"choose one of {', '.join(map(str, fits))}")


def synthetic_model(
    name: str, build: BuildConfig, device: str, dtype: str = "bfloat16", quant: QuantConfig | None = None,
    seed: int = 0, tp: TPGroup = SINGLE,
) -> tuple[LlamaForCausalLM, EngineConfig]:
    """A model of `name`'s shapes with random weights on `device` (this rank's share of them), and an
    engine config for it."""
    if name not in SHAPES:
        raise KilnError(f"--synthetic {name!r} is unknown: choose one of {', '.join(SHAPES)}")
    cfg = SHAPES[name]
    torch_dtype = getattr(torch, dtype)
    model = create_model(cfg, build.max_seq_len, device, tp, quant=quant, dtype=torch_dtype)
    tables = {n: b.clone() for n, b in model.named_buffers()}  # rotary tables: real, already on the device
    model.to_empty(device=device)  # (which leaves every tensor uninitialized, buffers too)
    for n, b in model.named_buffers():
        b.copy_(tables[n])
    gen = torch.Generator(device=device).manual_seed(seed + tp.rank)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            _fill(pname, p, gen)
    engine = EngineConfig(model=cfg, build=build, dtype=dtype, tp_size=tp.size, device=describe_device(device),
                          quantization=(quant or QuantConfig()).to_dict(), flags={"synthetic": name},
                          versions=current_versions())
    return model.eval(), engine


def _fill(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    """Weights ~ N(0, 0.02); norms 1; scales small; integer codes uniform; no tensor all zeros."""
    if p.dtype in (torch.int8, torch.uint8):
        hi = 16 if name.endswith("zeros") else (256 if p.dtype == torch.uint8 else 127)
        lo = 0 if p.dtype == torch.uint8 else -127
        p.copy_(torch.randint(lo, hi, p.shape, generator=gen, device=p.device, dtype=torch.int16).to(p.dtype))
    elif name.endswith(("layernorm.weight", "norm.weight")):
        p.fill_(1.0)
    elif name.endswith(("scales", "weight_scale")):
        p.copy_(torch.rand(p.shape, generator=gen, device=p.device) * 0.002 + 0.001)
    else:
        p.copy_((torch.randn(p.shape, generator=gen, device=p.device) * 0.02).to(p.dtype))


def synthetic_tokenizer(vocab_size: int, words: tuple[str, ...] = ()) -> object:
    """A word-level tokenizer of `vocab_size` tokens for a synthetic model, so that text requests (a
    server under load) work without a real model's tokenizer: `words` first, then filler tokens
    `t<id>`; one token per whitespace-separated word; id 0 is the unknown word, 1 the end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "</s>"] + [w for w in dict.fromkeys(words) if w not in ("<unk>", "</s>")]
    if len(names) > vocab_size:
        raise KilnError(f"{len(names)} words do not fit a vocabulary of {vocab_size}")
    names += [f"t{i}" for i in range(len(names), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
