"""kiln build: a kiln checkpoint -> an engine for this machine and these limits (trtllm-build's flags)."""

from __future__ import annotations

import argparse
import time

from kiln.cli.options import add_switch, positive_int

# Flags that trtllm-build takes and kiln accepts so that a seed's command line works unchanged.
# Each is recorded in engine.json; the help says what it means (or does not mean) in kiln.
_COMPAT_SWITCHES = {
    "--paged_kv_cache": (True, "kiln's KV cache is always paged; accepted for compatibility"),
    "--use_fused_mlp": (True, "gate and up projections are always fused into one matmul; accepted"),
    "--remove_input_padding": (True, "kiln always packs tokens without padding; accepted"),
    "--context_fmha": (True, "prefill attention is always fused (flash attention on GPUs); accepted"),
    "--use_paged_context_fmha": (True, "prefill attends over the paged cache (what chunked prefill "
                                 "needs); always on, accepted"),
    "--enable_xqa": (True, "grouped-query decode attention always processes the query heads that share a "
                     "KV head together; accepted"),
    "--paged_state": (False, "only meaningful for state-space models (Mamba); ignored"),
    "--gather_all_token_logits": (False, "kiln computes prompt-token logits when asked (kiln eval) "
                                  "whatever the engine; recorded in engine.json"),
}
_COMPAT_CHOICES = {
    "--gemm_plugin": (("auto", "disable", "float16", "bfloat16", "float32", "fp8", "nvfp4"),
                      "GEMM precision follows the checkpoint's dtype and quantization; accepted"),
    "--gpt_attention_plugin": (("auto", "disable", "float16", "bfloat16", "float32"),
                               "attention always uses kiln's paged kernels in the checkpoint's dtype; accepted"),
    "--logits_dtype": (("float16", "float32"), "logits are always computed in float32 for sampling; "
                       "accepted"),
    "--profiling_verbosity": (("layer_names_only", "detailed", "none"),
                              "TensorRT profiling detail; kiln has no TensorRT layers: ignored"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build an engine from a checkpoint for this device and these limits",
        description="Build an engine folder (engine.json + rank{i}.safetensors in the runtime layout) for "
        "this machine's device. Requests beyond the limits are refused with both numbers named.",
    )
    p.add_argument("--checkpoint_dir", required=True, help="checkpoint folder from `kiln convert`")
    p.add_argument("--output_dir", required=True, help="engine folder to write")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max_batch_size", type=positive_int, default=8, help="most sequences in flight (default 8)")
    limits.add_argument("--max_input_len", type=positive_int, default=None,
                        help="longest prompt in tokens (default 1024, at most max_seq_len)")
    limits.add_argument(
        "--max_seq_len", type=positive_int, default=None,
        help="longest prompt + output in tokens (default: the model's context, at most max(2048, max_input_len))",
    )
    limits.add_argument(
        "--max_num_tokens", type=positive_int, default=8192,
        help="most tokens computed in one step; longer prompts are prefilled in chunks (default 8192)",
    )
    limits.add_argument("--tokens_per_block", type=positive_int, default=64, help="tokens per KV-cache block (default 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--workers", type=positive_int, default=1, help="ranks of a tensor-parallel checkpoint built in parallel (default 1)")
    compat = p.add_argument_group("TensorRT-LLM flags accepted for compatibility")
    for flag, (default, text) in _COMPAT_SWITCHES.items():
        add_switch(compat, flag, default, text)
    for flag, (choices, text) in _COMPAT_CHOICES.items():
        compat.add_argument(flag, choices=choices, default=None, help=text)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.builder.build import build_engine
    from kiln.builder.device import default_device
    from kiln.checkpoint.format import load_config
    from kiln.config import BuildConfig
    from kiln.fsutil import require_dir

    start = time.perf_counter()
    ckpt = load_config(require_dir(args.checkpoint_dir, "--checkpoint_dir"))
    max_seq_len = args.max_seq_len or min(
        ckpt.model.max_position_embeddings, max(2048, args.max_input_len or 0)
    )
    build = BuildConfig(
        max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len or min(1024, max_seq_len),
        max_seq_len=max_seq_len,
        max_num_tokens=args.max_num_tokens,
        tokens_per_block=args.tokens_per_block,
    )
    flags = {f.lstrip("-"): getattr(args, f.lstrip("-")) for f in (*_COMPAT_SWITCHES, *_COMPAT_CHOICES)}
    flags["workers"] = args.workers
    device = args.device or default_device()
    cfg = build_engine(args.checkpoint_dir, args.output_dir, build, device, flags, workers=args.workers)
    print(
        f"engine written to {args.output_dir} for {cfg.device['name']} ({device}) in "
        f"{time.perf_counter() - start:.1f} s: max_batch_size {build.max_batch_size}, max_input_len "
        f"{build.max_input_len}, max_seq_len {build.max_seq_len}, max_num_tokens {build.max_num_tokens}, "
        f"tokens_per_block {build.tokens_per_block}"
    )
    return 0
