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

    Decodes incrementally, as vLLM does: each update decodes only a short window (the tokens of the
    previous delta, for context, plus the new ones) and keeps the difference, so a token costs the same
    at position 10 and at position 10,000. Holds back text that might still change: an incomplete UTF-8
    character at the end, and the last characters that could be the start of a stop string.
    `stop_hit` tells whether a stop string appeared; the text is then cut before it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stop_hit = False
        self._raw = ""  # the text of ids[:_read]
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context window of the next decode
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)  # no per-id Python checks
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> str:
        """Take `ids` (the whole output so far); return the new text that is safe to show."""
        self._advance(ids, final)
        text = self._raw
        found = [at for at in (text.find(s) for s in self.stop) if at != -1]
        if found:  # cut before the earliest stop string, whatever their order in `stop`
            text, final, self.stop_hit = text[: min(found)], True, True
        self.text = text
        end = len(text)
        if not final:
            end = max(self.emitted, end - self.hold)
        delta = text[self.emitted : end]
        self.emitted = end
        return delta

    def _advance(self, ids: list[int], final: bool) -> None:
        if len(ids) < self._read:  # the ids were cut back (an end token dropped): decode them whole
            self._raw, self._prefix, self._read = self._decode(ids), max(0, len(ids) - 1), len(ids)
            return
        before = self._decode(ids[self._prefix : self._read])
        after = self._decode(ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._raw += after[len(before) :]
            self._prefix, self._read = self._read, len(ids)
