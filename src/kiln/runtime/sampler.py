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


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [num_seqs, vocab] float32, modified in place and returned."""
    for row, seq in enumerate(seqs):
        p = seq.params
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
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep until the mass reaches top_p
        drop[0] = False  # the most likely token always stays, however small top_p is
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [num_seqs, vocab] float32 -> one token id per sequence."""
    if not seqs:
        return []
    if all(seq.params.plain_greedy for seq in seqs):  # the usual batch: one argmax, nothing per row
        return logits.argmax(dim=-1).tolist()
    want = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    logp = torch.log_softmax(logits[want], dim=-1) if want else None  # before the penalties edit logits
    if any(seq.params.edits_logits for seq in seqs):
        logits = apply_penalties(logits, seqs)
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            tokens.append(greedy[row])
            continue
        row_logits = filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # extreme settings overflowed float32: no distribution
            tokens.append(greedy[row])
            continue
        tokens.append(int(torch.multinomial(probs, 1, generator=seq.generator).item()))
    for j, row in enumerate(want):
        record_logprobs(seqs[row], logp[j], tokens[row])
    return tokens


def record_logprobs(seq: Sequence, logp: torch.Tensor, token: int) -> None:
    """logp: [vocab] log probabilities; appends the chosen token's and the top alternatives'."""
    seq.logprobs.append(float(logp[token]))
    k = seq.params.logprobs or 0
    if k:
        values, ids = torch.topk(logp, k)
        seq.top_logprobs.append(dict(zip(ids.tolist(), values.tolist())))
    else:
        seq.top_logprobs.append({})
