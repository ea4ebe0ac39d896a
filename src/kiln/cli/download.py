"""kiln download: a model from the Hugging Face Hub, only the files an engine needs (kiln.hub)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download a model from the Hugging Face Hub (config, tokenizer, one copy of the weights)",
        description="Download the files of a Hugging Face model repo that an engine needs: config.json, "
        "generation_config.json, the tokenizer files, and the *.safetensors weights (else *.bin), never "
        "Mistral's consolidated.* duplicates. The token comes from HF_TOKEN (gated repos), the Hub's address "
        "from HF_ENDPOINT (mirrors). A transfer that drops is resumed; after an interruption, running the "
        "same command again continues where it stopped.",
    )
    p.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, metavar="ORG/NAME",
                   help="the model repo, e.g. mistralai/Mistral-7B-v0.3")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                   help="folder to download into (new, empty, or an earlier download of the same repo)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    p.add_argument("--allow-patterns", "--allow_patterns", dest="allow_patterns", nargs="+", metavar="PATTERN",
                   help="download the files matching these glob patterns instead of kiln's choice")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.hub import describe_size, fetch, plan_download

    plan = plan_download(args.repo_id, args.revision, args.allow_patterns)
    print(f"{args.repo_id} at {args.revision} (commit {plan.commit[:12]}): {len(plan.files)} files, "
          f"{describe_size(plan.total_bytes)}", flush=True)
    for name, size in sorted(plan.files.items()):
        print(f"  {name:<48} {describe_size(size):>10}")
    start = time.perf_counter()
    folder = fetch(plan, args.output_dir)
    print(f"downloaded to {folder} in {time.perf_counter() - start:.1f} s")
    if plan.bin_weights:
        print("note: the weights are PyTorch .bin files, and kiln convert reads *.safetensors: re-save them "
              "as safetensors first (transformers: save_pretrained(..., safe_serialization=True))")
    print(f"next: kiln convert --model_dir {args.output_dir} --output_dir ckpt/{Path(folder).name} "
          "--dtype float16")
    return 0
