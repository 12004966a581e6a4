"""Training data: local text, code and chat JSONL files, tokenized and packed into fixed-length rows.

Documents stream from the files in order; each is tokenized, followed by EOS, and appended to a
running token stream that is cut into rows of ``seq_len``. Every token carries a loss flag: all tokens
of plain text, only the assistant replies of chat records (SFT). A document goes to the held-out split
when a hash of its text says so, so the split is stable across runs and file orders. The stream is
deterministic: resuming after ``n`` rows regenerates and skips them, exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tridlm.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...]  # files or folders (searched for .jsonl and TEXT_SUFFIXES)
    seq_len: int = 256
    heldout_percent: float = 2.0


def _files(sources: Sequence[str]) -> list[Path]:
    files = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES | {".jsonl"} and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"training data source {src} does not exist")
    if not files:
        raise ValueError(f"no training files under {', '.join(sources)}")
    return files


def _documents(files: list[Path]) -> Iterator[tuple[str, list[dict] | str]]:
    """(identity text, chat messages or plain text) per document."""
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    messages = record["messages"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{f}:{n}: expected a JSON object with 'messages'") from None
                yield line, messages
        else:
            text = f.read_text(errors="replace")
            if text.strip():
                yield text, text


def _tokens(tokenizer: Tokenizer, doc: list[dict] | str) -> tuple[list[int], list[bool]]:
    if isinstance(doc, str):
        ids = tokenizer.encode(doc)
        return ids, [True] * len(ids)
    ids, bearing = [], []
    for i, message in enumerate(doc):
        # Render the conversation up to and including this message; the new suffix is this message.
        rendered = tokenizer.encode(tokenizer.render_chat(doc[: i + 1], add_generation_prompt=False))
        new = rendered[len(ids) :]
        ids += new
        bearing += [message["role"] == "assistant"] * len(new)
    return ids, bearing


def _heldout(identity: str, percent: float) -> bool:
    digest = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:4], "big")
    return digest % 10_000 < percent * 100


class PackedData:
    """Rows of (tokens, loss mask), each (seq_len,), from one split of the sources."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, split: str = "train"):
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}")
        if tokenizer.eos_id is None:
            raise ValueError("packing needs an EOS token to separate documents")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.files = _files(cfg.sources)

    def rows(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rows forever (the sources repeat), after skipping ``skip`` of them."""
        L, emitted = self.cfg.seq_len, 0
        ids: list[int] = []
        bearing: list[bool] = []
        while True:
            produced = False
            for identity, doc in _documents(self.files):
                if _heldout(identity, self.cfg.heldout_percent) != (self.split == "heldout"):
                    continue
                t, b = _tokens(self.tokenizer, doc)
                ids += t + [self.tokenizer.eos_id]
                bearing += b + [b[-1] if b else False]  # EOS bears loss where its document's end does
                while len(ids) >= L:
                    produced = True
                    if emitted >= skip:
                        yield torch.tensor(ids[:L]), torch.tensor(bearing[:L])
                    emitted += 1
                    ids, bearing = ids[L:], bearing[L:]
            if not produced:
                raise ValueError(f"the {self.split} split holds fewer than {L} tokens")

    def batches(self, batch_size: int, skip_rows: int = 0, rank: int = 0, world: int = 1):
        """(x0, loss_mask) batches of (batch_size, seq_len); with several processes, rank r takes rows
        r, r + world, ... of each group of batch_size * world rows."""
        group: list = []
        for i, row in enumerate(self.rows(skip_rows)):
            if i % world == rank:
                group.append(row)
            if len(group) == batch_size and i % world == world - 1:
                yield torch.stack([g[0] for g in group]), torch.stack([g[1] for g in group])
                group = []
