"""The Llama-family decoder: Llama 1/2/3, Mistral (sliding window, Nemo's wide head_dim), Qwen2 (q/k/v bias).

One decoder with switches from ModelConfig; module names follow Hugging Face's so that a checkpoint
tensor name maps to its module directly, except that q/k/v and gate/up are fused (`packed_modules`).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed.comm import SINGLE, TPGroup
from kiln.layers.attention import Attention, AttentionMetadata
from kiln.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import RotaryEmbedding
from kiln.quant.methods import QuantConfig


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, tp: TPGroup, quant: QuantConfig | None
    ):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, tp, quant
        )
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp, bias=cfg.o_proj_bias, quant=quant
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.attn = Attention(
            layer, self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.sliding_windows[layer], rotary
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [n, (heads + 2 * kv_heads) * D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        out = self.attn(positions, q, k, v, meta)  # [n, heads, D]
        return self.o_proj(out.reshape(n, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, quant: QuantConfig | None):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], False, tp, quant)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, tp, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), gated=True)  # down(silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, tp: TPGroup, quant: QuantConfig | None
    ):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer, rotary, tp, quant)
        self.mlp = LlamaMLP(cfg, tp, quant)
        fp8 = quant is not None and quant.algo == "fp8"  # q/k/v and gate/up read the norms' outputs
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, quantize_fp8=fp8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, quantize_fp8=fp8)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_positions: int, device: torch.device | str, tp: TPGroup,
        quant: QuantConfig | None,
    ):
        super().__init__()
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, max_positions, device)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, self.rotary, tp, quant) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(ids), None  # [num_tokens, hidden]
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint (Hugging Face) projection name -> (runtime module name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, cfg: ModelConfig, max_positions: int, device: torch.device | str, tp: TPGroup = SINGLE,
        quant: QuantConfig | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.model = LlamaModel(cfg, max_positions, device, tp, quant)
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        return self.model(ids, positions, meta)

    @property
    def head(self) -> VocabParallelEmbedding:
        """The output projection: the LM head, or the embedding where they are tied."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[num_seqs, hidden] -> [num_seqs, vocab_size] float32 (written into `out`, [num_seqs,
        head.logits_columns], when given)."""
        return self.head.logits(hidden, out)

    def checkpoint_target(self, name: str) -> tuple[nn.Module, str, object] | None:
        """Map a checkpoint tensor name to (module, parameter name, shard id); None if it is not used."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None
        module_path, _, param = name.rpartition(".")
        parts = module_path.split(".")
        shard_id: object = None
        if parts[-1] in self.packed_modules:
            parts[-1], shard_id = self.packed_modules[parts[-1]]
        try:
            module = self.get_submodule(".".join(parts))
        except AttributeError:
            raise KeyError(name) from None
        if not isinstance(getattr(module, param, None), nn.Parameter):  # e.g. a bias this layer does not have
            raise KeyError(name)
        return module, param, shard_id

    def missing_parameters(self, names: list[str]) -> list[str]:
        """Runtime parameters (or parts of fused ones, e.g. `qkv_proj.weight[k]`) that no name feeds."""
        fed = set()
        for name in names:
            target = self.checkpoint_target(name)
            if target is not None:
                module, param, shard_id = target
                fed.add((id(getattr(module, param)), shard_id))
        parts: dict[str, list[object]] = {}
        for fused, shard_id in self.packed_modules.values():
            parts.setdefault(fused, []).append(shard_id)
        return [
            n if shard_id is None else f"{n}[{shard_id}]"
            for n, p in self.named_parameters()
            for shard_id in parts.get(n.split(".")[-2], [None])
            if (id(p), shard_id) not in fed
        ]
