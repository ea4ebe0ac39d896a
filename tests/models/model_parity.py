"""Helpers for the model-parity suite: tiny random Hugging Face models and kiln engines built from them.

Every family/feature is a `Variant`: a transformers config class and model class plus the keyword
arguments that switch the feature on. The `hf_model(name)` fixture (conftest.py) creates the model once
per session (seeded, every parameter random, norms and biases included), saves it with safetensors and
converts it to a float32 kiln checkpoint; `HFModel.llm(**build)` builds (and caches) an engine for a
BuildConfig and returns a fresh `LLM` on it.

The helpers that drive kiln are plain functions (`teacher_forced_logits`, `direct_prefill_logits`) so that
the tests can compare kiln's logits at every position against one full-sequence transformers forward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from kiln.builder.build import build_engine
from kiln.config import BuildConfig, SamplingParams
from kiln.layers.attention import AttentionMetadata
from kiln.runtime.engine import LLM
from kiln.runtime.sequence import Sequence

# float32 end to end: kiln's and transformers' logits agree to rounding.
ATOL = 1e-4

VOCAB = 160
MAX_SEQ_LEN = 64  # engines are built for this; the test sequences stay below it
SEQ_LEN = 32  # length of the teacher-forced test sequences (longer than every sliding window below)

BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # large enough that logits spread over several units, so errors show
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Variant:
    config_cls: str
    model_cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # What the converted kiln ModelConfig must say, so a variant cannot silently lose its feature.
    expect: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    # Llama-2 style: multi-head attention, default rope, untied.
    "llama2": Variant(
        "LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4),
        expect=dict(num_kv_heads=4, tie_word_embeddings=False, qkv_bias=False),
    ),
    # Llama-3.2 style: GQA, llama3 rope scaling, tied embeddings. original_max_position_embeddings is
    # small so that the scaled and the smoothed frequency bands both occur with head_dim 16.
    "llama3": Variant(
        "LlamaConfig", "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=64,
            ),
        ),
        expect=dict(num_kv_heads=2, tie_word_embeddings=True),
    ),
    # Linear rope scaling (position interpolation), multi-query attention.
    "llama-linear": Variant(
        "LlamaConfig", "LlamaForCausalLM",
        dict(num_key_value_heads=1, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
        expect=dict(num_kv_heads=1),
    ),
    # Mistral with a sliding window much shorter than the test sequence.
    "mistral": Variant(
        "MistralConfig", "MistralForCausalLM",
        dict(num_key_value_heads=2, sliding_window=7),
        expect=dict(sliding_windows=(7, 7), num_kv_heads=2),
    ),
    # Mistral-Nemo style: head_dim (32) != hidden / heads (16), no sliding window.
    "mistral-nemo": Variant(
        "MistralConfig", "MistralForCausalLM",
        dict(
            num_key_value_heads=2, head_dim=32, sliding_window=None,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        expect=dict(head_dim=32, sliding_windows=(0, 0)),
    ),
    # Llama with attention_bias: transformers then has a bias on q, k, v and o.
    "llama-attn-bias": Variant(
        "LlamaConfig", "LlamaForCausalLM",
        dict(num_key_value_heads=2, attention_bias=True),
        expect=dict(qkv_bias=True, o_proj_bias=True),
    ),
    # Qwen2: q/k/v bias, GQA, tied embeddings (as Qwen2-0.5B), rope_theta 1e6; a sliding_window that
    # use_sliding_window=false switches off (as in Qwen2's own config.json files).
    "qwen2": Variant(
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(
            num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False, sliding_window=5,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        expect=dict(qkv_bias=True, tie_word_embeddings=True, sliding_windows=(0, 0)),
    ),
    # Qwen2 with sliding window on the layers from max_window_layers up (layer 1 slides, layer 0 does not).
    "qwen2-sliding": Variant(
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(num_key_value_heads=4, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        expect=dict(qkv_bias=True, sliding_windows=(0, 6), num_kv_heads=4),
    ),
}

ALL_VARIANTS = list(VARIANTS)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a random value: HF initializes norms to 1 and biases to 0, which would hide
    a norm weight or a bias that kiln drops or misplaces."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_hf_model(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    v = VARIANTS[name]
    kwargs = {**BASE, **v.kwargs, **overrides}
    cfg = getattr(transformers, v.config_cls)(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, v.model_cls)(cfg)
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config.eos_token_id = None  # greedy generate must run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


@dataclass
class HFModel:
    name: str
    model: torch.nn.Module
    hf_dir: Path
    ckpt_dir: Path
    work: Path
    _engines: dict[tuple, Path] = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """transformers' logits of the whole sequence: [len(ids), vocab] float32."""
        out = self.model(input_ids=torch.tensor([ids]), use_cache=False)
        return out.logits[0].float()

    def engine_dir(self, **build: Any) -> Path:
        cfg = BuildConfig(**{"max_batch_size": 4, "max_input_len": 48, "max_seq_len": MAX_SEQ_LEN, **build})
        key = tuple(sorted(cfg.to_dict().items()))
        if key not in self._engines:
            out = self.work / f"engine-{len(self._engines)}"
            build_engine(self.ckpt_dir, out, cfg, device="cpu")
            self._engines[key] = out
        return self._engines[key]

    def llm(self, **build: Any) -> LLM:
        return LLM(self.engine_dir(**build), tokenizer_dir=None, device="cpu")


def token_ids(seed: int, n: int, low: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(low, VOCAB) for _ in range(n)]


def teacher_forced_logits(llm: LLM, sequences: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
    """Run kiln's scheduler and model runner on several sequences at once, feeding each the next token of
    its given sequence instead of a sampled one.

    Returns per sequence the logits kiln produced at positions prompt_len-1 .. len-2 (one prefill result,
    then one per decode step through the paged cache): [len - prompt_len, vocab].
    """
    params = [
        SamplingParams(max_tokens=len(s) - p, temperature=0, ignore_eos=True)
        for s, p in zip(sequences, prompt_lens, strict=True)
    ]
    seqs = [Sequence(list(s[:p]), sp) for s, p, sp in zip(sequences, prompt_lens, params, strict=True)]
    full = {seq.seq_id: s for seq, s in zip(seqs, sequences, strict=True)}
    got: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq in seqs}
    for seq in seqs:
        llm.scheduler.add(seq)
    steps = 0
    while not all(seq.finished for seq in seqs):
        steps += 1
        assert steps < 1000, "the scheduler made no progress"
        batch = llm.scheduler.schedule()
        assert batch, "nothing could be scheduled"
        sampled, logits = llm.runner.run(batch)
        assert logits.shape == (len(sampled), VOCAB) and logits.dtype == torch.float32
        forced = {}
        for seq, row in zip(sampled, logits, strict=True):
            got[seq.seq_id].append(row.clone())
            forced[seq.seq_id] = full[seq.seq_id][len(seq)]
        llm.scheduler.update(batch, forced)
    for seq, s in zip(seqs, sequences, strict=True):
        assert seq.all_ids == list(s)
    return [torch.stack(got[seq.seq_id]) for seq in seqs]


@torch.inference_mode()
def direct_prefill_logits(
    llm: LLM, ids: list[int], chunks: list[int], block_table: list[int]
) -> torch.Tensor:
    """Call kiln's model forward directly with AttentionMetadata built here: the sequence is written
    through the paged cache in `chunks` (token counts), using the given (possibly scattered) block table.
    Returns the logits at every position, [len(ids), vocab]."""
    assert sum(chunks) == len(ids)
    runner = llm.runner
    bs = runner.block_size
    assert len(block_table) * bs >= len(ids)
    table = torch.tensor([block_table], dtype=torch.int32)
    out = []
    start = 0
    for n in chunks:
        pos = list(range(start, start + n))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([block_table[p // bs] * bs + p % bs for p in pos], dtype=torch.int64),
            block_tables=table,
            seq_lens=[start + n],
            query_lens=[n],
            kv_caches=runner.kv_caches,
        )
        hidden = llm.model(torch.tensor(ids[start : start + n]), torch.tensor(pos), meta)
        out.append(llm.model.compute_logits(hidden))
        start += n
    return torch.cat(out)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"
