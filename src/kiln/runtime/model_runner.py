"""One step on the device: pack the scheduled tokens (no padding), run the model, return logits.

Prefill and decode share this path: a sequence contributes the tokens it has not computed yet, at
their positions, written to their cache slots; logits are computed only for sequences whose last
token was computed in this step.

Everything a step needs from the host (token ids, positions, cache slots, lengths, block tables) is
packed into one int64 tensor and copied to the device at once. On a GPU, decode steps (every sequence
adds one token) replay a CUDA graph captured at load time for the smallest batch-size bucket that holds
the batch: the whole forward pass, LM head included, is one launch, so decode runs at the speed of the
kernels rather than of Python. Padding rows of a bucket have no cache slot (-1) and length 0, so they
write nothing and read nothing.

With tensor parallelism, rank 0 sends each step's packed host tensor to the other ranks (`channel`)
before running it; they run the same step from that tensor alone (`serve`), so every rank launches the
same kernels and collectives in the same order, graphs included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.builder.engine_file import EngineConfig
from kiln.checkpoint.format import torch_dtype
from kiln.distributed.group import (
    OP_ALL_LOGITS,
    OP_FORWARD,
    OP_FORWARD_AHEAD,
    OP_GRAPH,
    OP_GRAPH_AHEAD,
    OP_STOP,
    StepChannel,
    trace,
)
from kiln.kernels import use_triton
from kiln.layers.attention import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM
from kiln.runtime.kv_cache import allocate_kv_cache
from kiln.runtime.scheduler import Batch
from kiln.runtime.sequence import Sequence
from kiln.runtime.steptrace import StepTrace
from kiln.runtime.transfer import pinned, to_device


def graph_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes that get a decode graph: 1, 2, 4, 8, then every 8 up to max_batch_size (inclusive)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch_size]
    sizes += list(range(8, max_batch_size, 8)) + [max_batch_size]
    return sorted(set(sizes))


@dataclass
class _Inputs:
    """Device views of one packed step: ids, positions, slots [T]; seq_lens [S]; tables [S, W]; qsl [S+1]."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    seq_lens: torch.Tensor
    tables: torch.Tensor
    query_start_loc: torch.Tensor


def _views(buf: torch.Tensor, tokens: int, seqs: int, width: int) -> _Inputs:
    parts = buf.split([tokens, tokens, tokens, seqs, seqs * width, seqs + 1])
    return _Inputs(parts[0], parts[1], parts[2], parts[3], parts[4].view(seqs, width), parts[5])


Fed = tuple[torch.Tensor, torch.Tensor]  # token indices of a step, and the ids they take (on the device)


def _ahead_rows(rows: list[int], feed: list[tuple[int, int]]) -> list[int]:
    """A step launched ahead, as the step message's row list: its sampled rows and its feed."""
    return [len(rows), *rows, *(x for pair in feed for x in pair)]


def _split_ahead_rows(message: list[int] | None) -> tuple[list[int], list[tuple[int, int]]]:
    assert message, "a step launched ahead carries its rows"
    n = message[0]
    rest = message[1 + n :]
    return message[1 : 1 + n], list(zip(rest[0::2], rest[1::2]))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    buf: torch.Tensor  # the packed inputs the graph reads
    logits: torch.Tensor  # [bucket, vocab] float32 the graph writes


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, cfg: EngineConfig, device: str, num_blocks: int,
        cuda_graphs: bool = True, channel: StepChannel | None = None,
    ):
        self.model = model
        self.device = device
        self.build = cfg.build
        self.block_size = cfg.build.tokens_per_block
        self.channel = channel  # rank 0 of a tensor-parallel group: every step is sent to the others first
        self.step_trace: StepTrace | None = None  # per-step timestamps (runtime/steptrace.py), when asked for
        attn = model.model.layers[0].self_attn
        self.kv_caches = allocate_kv_cache(
            cfg.model.num_layers, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim,
            torch_dtype(cfg.dtype), device,
        )
        self.kv_heads = attn.num_kv_heads
        self.fast = use_triton(self.kv_caches[0][0])
        self.max_blocks = -(-cfg.build.max_seq_len // self.block_size)
        self.graphs: dict[int, _Graph] = {}
        if cuda_graphs and self.fast and device.startswith("cuda"):
            self.capture_graphs()

    # ---- steps ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[Sequence], torch.Tensor]:
        """Returns the sequences to sample for and their logits [num_sampled, vocab] float32."""
        if self.step_trace:
            self.step_trace.start()
        # A graph computes one token per sequence and samples every one: each must be at its last token
        # (a prompt chunk cut to one token by the token budget is not).
        decode = all(n == 1 and seq.num_computed + 1 == len(seq) for seq, n in batch)
        if self.graphs and decode and len(batch) <= max(self.graphs):
            size = min(s for s in self.graphs if s >= len(batch))
            host = self._pack(batch, size, size, self.max_blocks)
            self._send(OP_GRAPH, size, size, self.max_blocks, host, [])
            return [seq for seq, _ in batch], self._replay(size, host)[: len(batch)]
        rows: list[int] = []
        to_sample: list[Sequence] = []
        count = 0
        for seq, n in batch:
            count += n
            if seq.num_computed + n == len(seq):
                rows.append(count - 1)
                to_sample.append(seq)
        # A fixed table width keeps the kernels' arguments the same whatever the lengths (no recompiles).
        width = max(self.max_blocks, *(len(seq.block_table) for seq, _ in batch))
        host = self._pack(batch, count, len(batch), width)
        self._send(OP_FORWARD, count, len(batch), width, host, rows)
        return to_sample, self._execute(host, count, len(batch), width, rows)

    @torch.inference_mode()
    def run_ahead(
        self, batch: Batch, starts: list[int], prev: torch.Tensor, prev_rows: dict[int, int],
    ) -> tuple[list[Sequence], torch.Tensor]:
        """A step launched while the previous one still runs (runtime/engine.py, overlapped steps).

        Sequence i computes n_i tokens from position starts[i], which may be past what the host has
        computed. A sequence starting at its length (one token past what the host holds) takes that
        token from the device: prev[prev_rows[seq_id]], of the previous step's chosen tokens. Returns,
        like `run`, the sequences to sample for (those whose step reaches their last token) and their
        logits.
        """
        count = 0
        rows: list[int] = []
        to_sample: list[Sequence] = []
        feed: list[tuple[int, int]] = []  # (token index in this step, row of prev)
        for (seq, n), start in zip(batch, starts):
            if start >= len(seq):
                feed.append((count, prev_rows[seq.seq_id]))
            count += n
            if start + n >= len(seq):  # its last known token, or the fed one after it
                rows.append(count - 1)
                to_sample.append(seq)
        fed = self._feedback(prev, feed)
        n_seqs = len(batch)
        if self.graphs and count == n_seqs == len(rows) and n_seqs <= max(self.graphs):
            size = min(s for s in self.graphs if s >= n_seqs)
            host = self._pack(batch, size, size, self.max_blocks, starts)
            self._send(OP_GRAPH_AHEAD, size, size, self.max_blocks, host, _ahead_rows([], feed))
            return to_sample, self._replay(size, host, fed)[:n_seqs]
        width = max(self.max_blocks, *(len(seq.block_table) for seq, _ in batch))
        host = self._pack(batch, count, n_seqs, width, starts)
        self._send(OP_FORWARD_AHEAD, count, n_seqs, width, host, _ahead_rows(rows, feed))
        return to_sample, self._execute(host, count, n_seqs, width, rows, fed)

    def _feedback(self, prev: torch.Tensor, feed: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, their ids taken from prev), on the device."""
        flat = [x for pair in feed for x in pair]
        pairs = to_device(flat, self.device).view(-1, 2)
        return pairs[:, 0], prev.index_select(0, pairs[:, 1])

    @torch.inference_mode()
    def run_all_logits(self, batch: Batch) -> torch.Tensor:
        """Logits of every scheduled token, [num_tokens, vocab] float32 (perplexity, prompt logits)."""
        count = sum(n for _, n in batch)
        width = max(self.max_blocks, *(len(seq.block_table) for seq, _ in batch))
        host = self._pack(batch, count, len(batch), width)
        self._send(OP_ALL_LOGITS, count, len(batch), width, host, None)
        return self._execute(host, count, len(batch), width, None)

    def _send(self, op: int, tokens: int, seqs: int, width: int, host: torch.Tensor, rows: list[int] | None) -> None:
        if self.channel is not None:
            self.channel.send(op, tokens, seqs, width, host, rows)

    @torch.inference_mode()
    def serve(self, channel: StepChannel) -> None:
        """A rank other than 0: run every step rank 0 sends, until it says stop. The logits are made here
        too (the LM head gathers across ranks) and dropped, but for their argmax: a step launched ahead
        takes its input ids from the previous step's (rank 0 samples)."""
        argmax = None
        while True:
            op, tokens, seqs, width, host, rows = channel.recv()
            if self.step_trace:
                self.step_trace.start()
            if op == OP_STOP:
                return
            if op in (OP_GRAPH_AHEAD, OP_FORWARD_AHEAD):
                if argmax is None:
                    raise RuntimeError("a step launched ahead, but no step before it to take tokens from")
                sample_rows, feed = _split_ahead_rows(rows)
                fed = self._feedback(argmax, feed)
                if op == OP_GRAPH_AHEAD:
                    logits = self._replay(tokens, host, fed)
                else:
                    logits = self._execute(host, tokens, seqs, width, sample_rows, fed)
            elif op == OP_GRAPH:
                logits = self._replay(tokens, host)
            else:
                logits = self._execute(host, tokens, seqs, width, rows)
            argmax = logits.argmax(dim=-1) if op != OP_ALL_LOGITS and logits.numel() else None

    def _execute(self, host: torch.Tensor, tokens: int, seqs: int, width: int, rows: list[int] | None,
                 fed: Fed | None = None) -> torch.Tensor:
        """Run the model on one packed step; logits of the token rows `rows` (None: every token). `fed`
        (token indices, ids; on the device) replaces those token ids of the packed ones (run_ahead)."""
        if self.step_trace:
            self.step_trace.launch("eager", tokens)
        logits = self._forward(host, tokens, seqs, width, rows, fed)
        if self.step_trace:
            self.step_trace.queued()
        return logits

    def _forward(self, host: torch.Tensor, tokens: int, seqs: int, width: int, rows: list[int] | None,
                 fed: Fed | None = None) -> torch.Tensor:
        inputs = _views(to_device(host, self.device), tokens, seqs, width)
        if fed is not None:
            inputs.ids.index_copy_(0, *fed)
        lens = host[3 * tokens : 3 * tokens + seqs].tolist()
        starts = host[-(seqs + 1) :].tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        meta = self._metadata(lens, query_lens, inputs, num_splits=self._num_splits(seqs))
        hidden = self.model(inputs.ids, inputs.positions, meta)
        if rows is None:
            return self.model.compute_logits(hidden)
        if not rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[to_device(rows, self.device)])

    def _pack(self, batch: Batch, tokens: int, seqs: int, width: int, starts: list[int] | None = None) -> torch.Tensor:
        """The host side of one step, as one int64 tensor laid out as `_views` reads it. Rows past the
        batch (bucket padding) have slot -1, length 0 and block 0. Sequence i starts at starts[i] if
        given (run_ahead), else at its first uncomputed token; a token the host does not have yet is
        left 0 (the device fills it in). (benchmarks/host_overhead.py times this.)"""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        tables: list[int] = []
        qsl = [0]
        bs = self.block_size
        end = 0
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed if starts is None else starts[i]
            table = seq.block_table
            if n == 1:  # a decode: one token, most steps' only kind
                ids.append(seq.ids(start, start + 1)[0] if start < len(seq) else 0)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                known = seq.ids(start, start + n)
                ids += known + [0] * (n - len(known))
                span = range(start, start + n)
                positions += span
                slots += [table[p // bs] * bs + p % bs for p in span]
            lens.append(start + n)
            tables += table
            if len(table) < width:
                tables += [0] * (width - len(table))
            end += n
            qsl.append(end)
        pad_tokens, pad_seqs = tokens - len(ids), seqs - len(batch)
        if pad_tokens:
            ids += [0] * pad_tokens
            positions += [0] * pad_tokens
            slots += [-1] * pad_tokens
        if pad_seqs:
            lens += [0] * pad_seqs
            tables += [0] * (pad_seqs * width)
            qsl += [end] * pad_seqs
        return torch.tensor(ids + positions + slots + lens + tables + qsl, dtype=torch.int64)

    def _metadata(
        self, seq_lens: list[int], query_lens: list[int], inputs: _Inputs, num_splits: int,
        decode: bool | None = None,
    ) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=inputs.slots,
            block_tables=inputs.tables,
            seq_lens=seq_lens,
            query_lens=query_lens,
            kv_caches=self.kv_caches,
            seq_lens_t=inputs.seq_lens,
            query_start_loc=inputs.query_start_loc,
            max_query_len=max(query_lens, default=1),
            decode=all(n == 1 for n in query_lens) if decode is None else decode,
            num_splits=num_splits,
        )

    def _num_splits(self, num_seqs: int) -> int:
        if not self.fast:
            return 1
        from kiln.kernels import num_sms
        from kiln.kernels.decode_attention import choose_num_splits

        return choose_num_splits(num_seqs, self.kv_heads, self.build.max_seq_len, self.block_size,
                                 num_sms(self.device))

    # ---- CUDA graphs ---------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture one decode graph per batch-size bucket (largest first, sharing one memory pool).

        Every graph writes its logits into the first rows of one buffer: a graph's output lives as long as
        the graph, and one [bucket, vocab] float32 tensor per bucket would cost 8.5 GB at 512 sequences of
        Llama-3's 128k vocabulary. Steps run in stream order, so a step's logits are read before the
        next step overwrites them."""
        buckets = graph_buckets(self.build.max_batch_size)
        shared = torch.empty(max(buckets), self.model.head.logits_columns, dtype=torch.float32, device=self.device)
        pool = None
        for size in reversed(buckets):
            buf = self._pack([], size, size, self.max_blocks).to(self.device)
            inputs = _views(buf, size, size, self.max_blocks)
            meta = self._metadata([], [], inputs, num_splits=self._num_splits(size), decode=True)
            meta.max_query_len = 1
            trace(f"capturing the decode graph of batch size {size}")
            for _ in range(2):  # compile and autotune outside the capture
                self.model.compute_logits(self.model(inputs.ids, inputs.positions, meta), shared[:size])
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(inputs.ids, inputs.positions, meta), shared[:size])
            pool = graph.pool()
            self.graphs[size] = _Graph(graph, buf, logits)
        torch.cuda.synchronize(self.device)

    def _replay(self, size: int, host: torch.Tensor, fed: Fed | None = None) -> torch.Tensor:
        """Replay the graph of bucket `size` on packed inputs (token ids replaced as `fed` says, on the
        device: run_ahead); its logits [size, vocab]."""
        g = self.graphs[size]
        if self.step_trace:
            self.step_trace.launch("graph", size)
        g.buf.copy_(pinned(host), non_blocking=True)
        if fed is not None:
            g.buf.index_copy_(0, *fed)  # the ids come first in the buffer
        g.graph.replay()
        if self.step_trace:
            self.step_trace.queued()
        return g.logits
