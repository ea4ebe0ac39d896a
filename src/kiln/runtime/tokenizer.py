"""Loading a Hugging Face tokenizer, and incremental detokenization for streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import KilnError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files present in `folder` (copied along when a checkpoint should double as one)."""
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def load_tokenizer(tokenizer_dir: str | Path) -> Any:
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise KilnError(f"--tokenizer_dir {tokenizer_dir}: no such folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"--tokenizer_dir {tokenizer_dir}: cannot load a tokenizer ({first})") from None


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Holds back text that might still change: an incomplete UTF-8 character at the end, and the last
    characters that could be the start of a stop string. `stop_hit` tells whether a stop string appeared;
    the text is then cut before it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stop_hit = False

    def update(self, ids: list[int], final: bool = False) -> str:
        """Decode `ids` (the whole output so far); return the new text that is safe to show."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        found = [at for at in (text.find(s) for s in self.stop) if at != -1]
        if found:  # cut before the earliest stop string, whatever their order in `stop`
            text, final, self.stop_hit = text[: min(found)], True, True
        self.text = text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            end = max(self.emitted, end - self.hold)
        delta = text[self.emitted : end]
        self.emitted = end
        return delta
