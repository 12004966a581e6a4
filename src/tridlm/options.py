"""Config fields that carry their own help: ``name: int = option(8, "what it is")`` in a dataclass. The CLI makes
one flag per field with this help (``cli._options``)."""

from __future__ import annotations

from dataclasses import field


def option(default, help: str):
    """A dataclass field with ``default`` and a help text."""
    return field(default=default, metadata={"help": help})
