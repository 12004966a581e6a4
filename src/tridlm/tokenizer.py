"""Tokenizer: a ``tokenizers`` BPE plus the chat template and special-token ids of a model."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2.meta
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's pre-tokenizer names -> the regex split that precedes byte-level BPE.
_GPT2_PRE = {"smollm", "gpt2", "default"}
# llama.cpp's token types (``tokenizer.ggml.token_type``)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False) -> str:
    """``tojson`` as Hugging Face gives it to chat templates (tools, arguments): JSON as written, where jinja's own
    escapes ``<``, ``>``, ``&`` and ``'`` for HTML."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV.filters["tojson"] = _tojson


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled once (compiling costs milliseconds, far more than rendering)."""
    return _ENV.from_string(template)


@functools.lru_cache(maxsize=16)
def _reads(template: str) -> frozenset[str]:
    """The variables a chat template reads (``messages``, ``tools``, ...)."""
    return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(template)))


@dataclass
class Tokenizer:
    backend: HFTokenizer
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None

    @classmethod
    def from_gguf(cls, fields: dict) -> Tokenizer:
        """Rebuild the byte-level BPE stored in a GGUF file's ``tokenizer.ggml.*`` metadata (``fields``: key ->
        value, as ``tridlm.gguf_file.GGUFFile`` reads them)."""

        def field(name, default=None):
            return fields.get(name, default)

        kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _GPT2_PRE:
            raise ValueError(f"unsupported GGUF tokenizer: model={kind!r} pre={pre!r} (supported: gpt2 byte-level BPE)")
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}  # not padding rows
        backend = HFTokenizer(models.BPE(vocab, merges))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=pre == "smollm"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
        )
        backend.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        return cls(
            backend,
            field("tokenizer.chat_template"),
            field("tokenizer.ggml.bos_token_id"),
            field("tokenizer.ggml.eos_token_id"),
        )

    def gguf_fields(self, rows: int) -> dict:
        """The ``tokenizer.*`` metadata of a GGUF file (llama.cpp's keys) for a model with ``rows`` embedding rows:
        a token per row, rows past the vocabulary as unused ``[PAD<id>]`` tokens (llama.cpp wants one per row).
        Byte-level BPE with GPT-2's split only (the tokenizers ``from_gguf`` reads back; SmolLM2's splits digits)."""
        spec = json.loads(self.backend.to_str())
        pre = _llama_cpp_pre(spec.get("pre_tokenizer"))
        if spec["model"]["type"] != "BPE" or pre is None:
            raise ValueError(
                "GGUF export writes byte-level BPE tokenizers with GPT-2's split (digits split or not); this one is "
                f"{spec['model']['type']} with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]}"
            )
        added = self.backend.get_added_tokens_decoder()
        by_id = {i: t for t, i in self.backend.get_vocab(with_added_tokens=True).items()}
        if rows < len(by_id) or max(by_id) >= rows:
            raise ValueError(f"the tokenizer has ids beyond the model's {rows} embedding rows")
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(rows)]
        types = [
            UNUSED if i not in by_id else NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED
            for i in range(rows)
        ]
        fields = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
            "tokenizer.ggml.add_bos_token": False,  # prompts are encoded as they are (chat templates hold the BOS)
            "tokenizer.ggml.add_space_prefix": False,
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
            "tokenizer.chat_template": self.chat_template,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and a Hugging Face style ``tokenizer_config.json``."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "bos_token": self._token(self.bos_id) or None,
            "eos_token": self._token(self.eos_id) or None,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Read ``tokenizer.json`` plus the chat template and BOS/EOS of ``tokenizer_config.json``
        (or ``chat_template.jinja``) as Hugging Face writes them."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: missing tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise ValueError(f"{path}: unreadable tokenizer ({e})") from None
        meta_path = directory / "tokenizer_config.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        template = meta.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()

        def token_id(key):
            token = meta.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else backend.token_to_id(token)

        return cls(backend, template, token_id("bos_token"), token_id("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it are recognised as such. (The batch call releases
        the GIL: a server tokenizing a long prompt in a thread keeps answering meanwhile.)"""
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token decodes to: a text longer than n times this has more than n tokens."""
        return max(len(self.backend.decode([i], skip_special_tokens=False)) for i in range(self.vocab_size))

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens."""
        return self.backend.decode(ids, skip_special_tokens=True)

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template renders the tools it is given (``tools``) and has calls written in
        ``<tool_call>`` tags (the Hermes form, ``serve.tools``)."""
        return (
            bool(self.chat_template) and "tools" in _reads(self.chat_template) and "<tool_call>" in self.chat_template
        )

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The chat template applied to OpenAI-style messages; ``tools`` (OpenAI's) for a template that renders them."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat messages need string 'role' and 'content' fields, got {m!r}")
        special = {"bos_token": self._token(self.bos_id), "eos_token": self._token(self.eos_id)}
        try:
            return _compiled(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **special
            )
        except jinja2.TemplateError as e:  # the template's own raise_exception(), or what the sandbox refuses
            raise ValueError(f"the chat template refused these messages: {e}") from None

    def _token(self, i: int | None) -> str:
        return "" if i is None else self.backend.id_to_token(i)

    def encode_chat(self, messages: list[dict], tools: list | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, tools=tools))


def _llama_cpp_pre(pre: dict | None) -> str | None:
    """llama.cpp's name of a ``tokenizer.json`` pre-tokenizer that ``Tokenizer.from_gguf`` rebuilds, else None."""
    parts = (pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]) if pre else []
    if not parts or parts[-1].get("type") != "ByteLevel" or not parts[-1].get("use_regex", True):
        return None
    if len(parts) == 1:
        return "gpt2"
    if len(parts) == 2 and parts[0].get("type") == "Digits":
        return "smollm" if parts[0].get("individual_digits") else "gpt2"
    return None


def stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string in text begins (None if there is none)."""
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


class TextStream:
    """Incremental detokenizer for streaming: deltas never split a UTF-8 character, and text that
    might begin a stop string is held back until it is known not to (stop strings never leak).

    Linear in the text: each push decodes only the new tokens (beside a few before them, so that decoders
    which treat a text's start specially agree with decoding the whole) and searches for stop strings only
    where the new text could complete one."""

    CONTEXT = 4  # tokens decoded before the new ones
    UTF8 = 4  # tokens held at most while their text ends in an incomplete character (its bytes are at most 4)

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # the text of tokens[: self.read]
        self.read = 0
        self.sent = 0  # characters already returned
        self.searched = 0  # no stop string begins before searched - (its length - 1)
        self.end: int | None = None  # where the first stop string begins, once found

    def push(self, tokens: list[int], final: bool = False) -> str:
        """The new text after appending tokens; ``final`` releases whatever was held back."""
        self.tokens.extend(tokens)
        if self.end is None:
            self._decode(final)
            self.end = self._find_stop()
        if self.end is not None:
            end = self.end
        elif final:
            end = len(self.text)
        else:  # hold back any tail that could be the start of a stop string
            end = len(self.text) - max(
                (n for s in self.stop for n in range(1, min(len(s), len(self.text) + 1)) if self.text.endswith(s[:n])),
                default=0,
            )
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

    def _decode(self, final: bool) -> None:
        if self.read == len(self.tokens):
            return
        start = max(0, self.read - self.CONTEXT)
        before = self.tokenizer.decode(self.tokens[start : self.read])
        after = self.tokenizer.decode(self.tokens[start:])
        # An incomplete multi-byte character decodes to U+FFFD at the end: wait for its next bytes.
        if after.endswith("\ufffd") and not final and len(self.tokens) - self.read < self.UTF8:
            return
        new = after[len(before) :] if after.startswith(before) else self.tokenizer.decode(self.tokens)[len(self.text) :]
        self.text += new
        self.read = len(self.tokens)

    def _find_stop(self) -> int | None:
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.searched - len(s) + 1))) >= 0]
        self.searched = len(self.text)
        return min(hits) if hits else None


def find_mask_token(tokenizer: Tokenizer) -> int | None:
    """An existing special token to reuse as MASK (SPEC 1.1): one named like a mask if there is one,
    else the highest-id control token that is neither BOS/EOS nor used by the chat template."""
    special = sorted((i, t.content) for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special)
    for i, text in special:
        if "mask" in text.lower():
            return i
    unused = [
        i
        for i, text in special
        if i not in (tokenizer.bos_id, tokenizer.eos_id) and text not in (tokenizer.chat_template or "")
    ]
    return max(unused, default=None)
