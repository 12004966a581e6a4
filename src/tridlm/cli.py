"""Command line: one table of commands (``COMMANDS``: help, the flags, the function in ``commands`` that runs it).

Only the command named on the command line gets its flags built, and each imports what it needs when it runs
(``tridlm serve`` never loads the trainer).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import NamedTuple

from tridlm import commands


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"tridlm: error: {message}\n")


def _threshold(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")
    return value == "on"


def _list(kind):
    def parse(value: str) -> tuple:
        return tuple(kind(v) for v in value.split(",") if v)

    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    from tridlm import loading

    _options(p, loading.Source(), {"dtype": loading.DTYPE_CHOICES})


def _generate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as tokens are committed")
    out.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and counts")
    shape = p.add_argument_group("structured output, in every mode (tridlm.grammar)").add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE|JSON", help="the output is JSON valid against this schema")
    shape.add_argument("--json-object", action="store_true", help="the output is one JSON object")
    shape.add_argument("--regex", metavar="PATTERN", help="the whole output matches this regular expression")
    shape.add_argument("--lark", metavar="FILE", help="the output follows this Lark grammar (llguidance's dialect)")
    _generation_options(p)


def _generation_options(p: argparse.ArgumentParser) -> None:
    from tridlm.decode import MODES, SPEC_VARIANTS, GenerationConfig

    _options(
        p,
        GenerationConfig(),
        {"mode": MODES, "spec_variant": SPEC_VARIANTS, "threshold": _threshold, "stop": "append", "lookup": _on_off},
        skip=("grammar",),
    )


def _eval_parser(p: argparse.ArgumentParser) -> None:
    from tridlm.measure import evaluate, suite_data

    p.add_argument("task", choices=[*evaluate.TASKS, *suite_data.TASKS])
    p.add_argument("--json", action="store_true", help="print one JSON line: settings, score, counts, speed")
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="run the model's answers as code (humaneval), in a sandbox (tridlm.measure.sandbox says which)",
    )
    _options(p, evaluate.EvalOptions(), skip=("allow_code_execution",))
    _generation_options(p)


def _lm_eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's own arguments (lm-eval run --help)")
    p.set_defaults(no_model_args=True, passthrough=True)


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--block-size", type=int, help="default: per device and mode")


def _convert_parser(p: argparse.ArgumentParser) -> None:
    from tridlm import loading

    p.add_argument("source", help='HF or NLD checkpoint directory, a GGUF file, or "default" (the embedded model)')
    p.add_argument("output", help="NLD directory to write, or a tri-mode GGUF file (a name ending in .gguf)")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument(
        "--mask-token", help="existing token to use as MASK (default: the model's, or an unused special token)"
    )
    mask.add_argument("--add-mask-token", action="store_true", help="grow the vocabulary by a new <|mask|> token")
    p.add_argument(
        "--block-size",
        type=int,
        help="diffusion block size recorded in config.json (default: the model's own, if it has one)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted({*loading.DTYPES, *loading.GGUF_DTYPES}),
        default="bfloat16",
        help="weights to write: float32 or bfloat16 for a directory; int4 (Q4_1, the engine's codes), int8 (Q8_0) "
        "or bfloat16 for a GGUF file",
    )
    p.add_argument("--shard-gb", type=float, default=4.0, help="maximum size of one safetensors shard")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing, non-empty output (only once the new one is written whole)",
    )
    p.set_defaults(no_model_args=True)


_TYPES = {"int": int, "float": float, "str": str}


def _options(
    p: argparse.ArgumentParser,
    defaults,
    kinds: dict | None = None,
    helps: dict | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One --flag per field of a config dataclass, typed by its annotation or ``kinds`` (a parser, a tuple of
    choices, or "append"), helped by the field's help (``options.option``) or ``helps``; tuples are
    comma-separated, booleans that default to true become --no-flag."""
    kinds = kinds or {}
    helps = {**{f.name: f.metadata.get("help") for f in dataclasses.fields(defaults)}, **(helps or {})}
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        value, flag, h = getattr(defaults, f.name), "--" + f.name.replace("_", "-"), helps.get(f.name)
        # "int | None" -> int; "tuple[float | None, ...]" -> float (the parser of one item)
        annotation = str(f.type).removeprefix("tuple[").split("|")[0].split(",")[0].strip()
        kinds.setdefault(f.name, _TYPES.get(annotation, str))
        if kinds.get(f.name) == "append":
            p.add_argument(flag, action="append", default=[], help=h)
        elif isinstance(value, bool):
            p.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=h)
        elif isinstance(value, tuple):
            p.add_argument(flag, type=_list(kinds[f.name]), default=value, help=h)
        elif isinstance(kinds.get(f.name), tuple):
            p.add_argument(flag, choices=kinds[f.name], default=value, help=h)
        else:
            p.add_argument(flag, type=kinds[f.name], default=value, help=h)


def _bench_parser(p: argparse.ArgumentParser) -> None:
    from tridlm.measure import suite

    _options(p, suite.Options(), {"thresholds": _threshold}, {"sweep": "skip the forward-latency sweep"})


def _train_parser(p: argparse.ArgumentParser) -> None:
    from tridlm.train.data import DataConfig
    from tridlm.train.loop import DRAFT_LAYOUTS, REGIMES, TrainConfig

    p.add_argument("--data", nargs="+", required=True, help="text/code files, folders, or chat JSONL files")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt and the trained adapter or model")
    p.add_argument("--until", type=int, help="stop (with a checkpoint) at this step of the schedule")
    p.add_argument("--seq-len", type=int, default=DataConfig(()).seq_len)
    _options(p, TrainConfig(), {"regime": REGIMES, "autocast": ("auto", "bf16", "off"), "draft_layout": DRAFT_LAYOUTS})


def _distill_parser(p: argparse.ArgumentParser) -> None:
    from tridlm.train import distill

    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=512, help="how many prompts")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source",
        choices=distill.SOURCES,
        default="mixed",
        help="mixed: stdlib questions and templated requests; magpie: requests the model writes itself",
    )


def _export_adapter_parser(p: argparse.ArgumentParser) -> None:
    from tridlm import loading

    p.add_argument("out", help="folder to write")
    p.add_argument("--adapter-dtype", choices=loading.DTYPES, default="bfloat16", help="dtype of the written weights")


def _eval_draft_parser(p: argparse.ArgumentParser) -> None:
    from tridlm.measure import draft_eval

    _options(p, draft_eval.DraftOptions(), {"threshold": _threshold})


def _serve_parser(p: argparse.ArgumentParser) -> None:
    from tridlm.decode import MODES
    from tridlm.serve.config import ServerConfig

    p.add_argument(
        "--cost-curve",
        help="a cost curve saved with tridlm.decode.CostCurve.save for auto to plan with "
        "(default: measured before serving)",
    )
    p.add_argument(
        "--api-key-file",
        help="a file of API keys, one per line ('#' comments): each is a tenant, besides those of --api-key",
    )
    p.add_argument(
        "--block-size", type=int, help="block size of requests that name none (default: per device and mode)"
    )
    _options(p, ServerConfig(), {"default_mode": MODES, "api_key": "append"}, skip=("defaults",))
    p.set_defaults(served_model_name=None)


class Command(NamedTuple):
    help: str
    flags: Callable[[argparse.ArgumentParser], None]  # adds the command's own flags
    run: Callable[[argparse.Namespace], None]


COMMANDS = {
    "generate": Command("generate text from a prompt", _generate_parser, commands.generate),
    "eval": Command(
        "score a task (humaneval, gsm8k; mmlu, arc-challenge, truthfulqa-mc1, gsm8k-full through lm-eval) in a mode "
        "and precision, beside its speed",
        _eval_parser,
        commands.eval_task,
    ),
    "lm-eval": Command(
        "lm-eval's command line with the tridlm model registered and the suite's tasks (tridlm_mmlu ...) included",
        _lm_eval_parser,
        commands.lm_eval_cli,
    ),
    "demo": Command("answer a chat prompt in every mode and compare", _demo_parser, commands.demo),
    "convert": Command(
        "convert an HF/NLD directory or a GGUF file to an NLD directory", _convert_parser, commands.convert
    ),
    "bench": Command("speed and quality of modes and baselines on a prompt set", _bench_parser, commands.bench),
    "train": Command("train a draft adapter (or all weights) on the joint objective", _train_parser, commands.train),
    "distill": Command(
        "write the model's own greedy answers to generated prompts as chat JSONL", _distill_parser, commands.distill
    ),
    "export-adapter": Command(
        "write the model's draft adapter (see --adapter) as a PEFT folder",
        _export_adapter_parser,
        commands.export_adapter,
    ),
    "eval-draft": Command(
        "held-out spec accepted length and diffusion quality of a draft adapter",
        _eval_draft_parser,
        commands.eval_draft,
    ),
    "serve": Command("serve the model over an OpenAI-compatible HTTP API", _serve_parser, commands.serve),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, with the flags of ``command`` only (of all when None)."""
    parser = _Parser(prog="tridlm", description="Tri-mode diffusion language models: ar, diffusion, spec.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help)
        if command in (None, name):
            c.flags(p)
            if not p.get_default("no_model_args"):
                _model_args(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.args = rest + args.args
    try:
        COMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tridlm: error: {e}", file=sys.stderr)
        sys.exit(2)
