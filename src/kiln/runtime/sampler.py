"""Token selection with every option per sequence: penalties, temperature, top-k, top-p, seeds.

Order (as Hugging Face and TensorRT-LLM apply them): bad words, repetition penalty over prompt and
output, presence and frequency penalties over the output, then greedy argmax, or temperature, top-k,
top-p and a draw from the sequence's own generator (so a seed reproduces a request whatever it is
batched with). Log probabilities, when asked for, are those of the model's own distribution, before
any of these.
"""

from __future__ import annotations

import torch

from kiln.runtime.sequence import Sequence
from kiln.runtime.transfer import to_device


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [num_seqs, vocab] float32, modified in place and returned."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.edits_logits:
            continue
        for bad in p.bad_token_ids:
            if bad and (len(bad) == 1 or seq.all_ids[-(len(bad) - 1) :] == list(bad[:-1])):
                logits[row, bad[-1]] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.int64, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            out = torch.tensor(seq.output_ids, dtype=torch.int64, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [vocab] -> same with tokens outside the top-k / top-p nucleus set to -inf."""
    return filter_rows(logits[None], [top_k], [top_p])[0]


def filter_rows(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """filter_top_k_top_p for every row at once, each with its own settings: [rows, vocab] -> same."""
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if any(ks):
        kth = torch.topk(logits, max(ks), dim=-1).values  # [rows, max k], descending
        index = to_device([max(k, 1) - 1 for k in ks], logits.device)
        threshold = kth.gather(1, index[:, None])
        off = to_device([k == 0 for k in ks], logits.device, torch.bool)[:, None]
        logits = logits.masked_fill(~off & (logits < threshold), float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        limit = to_device(top_p, logits.device, probs.dtype)[:, None]
        drop = (probs.cumsum(-1) - probs >= limit) & (limit < 1.0)  # keep until the mass reaches top_p
        drop[:, 0] = False  # the most likely token always stays, however small top_p is
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [num_seqs, vocab] float32 -> one token id per sequence.

    The rows that draw are filtered and normalized together; unseeded ones then draw together from the
    global generator, seeded ones each from its own (so a seed's draws do not depend on the batch).
    """
    if not seqs:
        return []
    if all(seq.params.plain_greedy for seq in seqs):  # the usual batch: one argmax, nothing per row
        return logits.argmax(dim=-1).tolist()
    want = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    logp = torch.log_softmax(logits[want], dim=-1) if want else None  # before the penalties edit logits
    if any(seq.params.edits_logits for seq in seqs):
        logits = apply_penalties(logits, seqs)
    chosen = choose(logits, seqs).tolist()
    for j, row in enumerate(want):
        record_logprobs(seqs[row], logp[j], chosen[row])
    return chosen


def on_device(seqs: list[Sequence]) -> bool:
    """Whether `choose` alone picks these sequences' tokens (SamplingParams.needs_host)."""
    return not any(seq.params.needs_host for seq in seqs)


def choose(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The token of each row, on the logits' device and without waiting for it: the argmax for greedy
    rows, a draw for the others (penalties already applied)."""
    greedy = logits.argmax(dim=-1)
    drawn = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
    if not drawn:
        return greedy
    params = [seqs[row].params for row in drawn]
    rows = to_device(drawn, logits.device)
    temps = to_device([p.temperature for p in params], logits.device, logits.dtype)
    probs = torch.softmax(filter_rows(logits.index_select(0, rows) / temps[:, None], [p.top_k for p in params],
                                      [p.top_p for p in params]), dim=-1)
    # extreme settings can overflow float32 (no distribution left): those rows take the argmax
    ok = torch.isfinite(probs).all(dim=-1)
    probs = torch.where(ok[:, None], probs, 0.0)
    probs[:, 0] += (~ok).to(probs.dtype)  # (any valid distribution: the row is replaced below)
    tokens = torch.empty(len(drawn), dtype=torch.int64, device=logits.device)
    own = [i for i, row in enumerate(drawn) if seqs[row].generator is not None]
    shared = [i for i, row in enumerate(drawn) if seqs[row].generator is None]
    if shared:
        at = to_device(shared, logits.device)
        tokens.index_copy_(0, at, torch.multinomial(probs.index_select(0, at), 1)[:, 0])
    for i in own:
        tokens[i : i + 1] = torch.multinomial(probs[i], 1, generator=seqs[drawn[i]].generator)
    greedy.index_copy_(0, rows, torch.where(ok, tokens, greedy.index_select(0, rows)))
    return greedy


def record_logprobs(seq: Sequence, logp: torch.Tensor, token: int) -> None:
    """logp: [vocab] log probabilities; appends the chosen token's and the top alternatives'."""
    seq.logprobs.append(float(logp[token]))
    k = seq.params.logprobs or 0
    if k:
        values, ids = torch.topk(logp, k)
        seq.top_logprobs.append(dict(zip(ids.tolist(), values.tolist())))
    else:
        seq.top_logprobs.append({})
