"""Command line: a dispatcher from arguments to library calls. Argument parsing lives here only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from tridlm import bench, checkpoint, demo, loading
from tridlm.decode import MODES, SPEC_VARIANTS, GenerationConfig, generate
from tridlm.serve.config import ServerConfig
from tridlm.tokenizer import TextStream
from tridlm.train import distill
from tridlm.train.data import DataConfig
from tridlm.train.loop import REGIMES, TrainConfig, Trainer, distributed


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"tridlm: error: {message}\n")


def _threshold(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _list(kind):
    def parse(value: str) -> tuple:
        return tuple(kind(v) for v in value.split(",") if v)
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def _fill(cls, args, **extra):
    """A config dataclass from the parsed arguments of the same names (lists become tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **extra}).validate()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="NLD or Hugging Face checkpoint directory, or a GGUF file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=loading.DTYPE_CHOICES, default="float32",
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16/amx_bf16), else float32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--adapter", help="draft adapter folder (PEFT layout), or 'none' for the bare model (default: the "
                                     "model's own linear_spec_lora/, or the shipped one of the default model)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--cuda-graphs", type=int, metavar="CAPACITY", default=0,
                   help="replay per-cycle forwards as CUDA graphs over a static cache of CAPACITY tokens")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as tokens are committed")
    out.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and counts")
    _options(p, GenerationConfig(), {"mode": MODES, "spec_variant": SPEC_VARIANTS, "threshold": _threshold,
                                     "stop": "append"},
             {"block_size": "default: per device and mode (tridlm.device.BLOCK_SIZES), at most the model's training "
              "block size", "threshold": "diffusion confidence, or 'none'", "stop": "stop string (repeatable)",
              "spec_variant": "spec: linear (draft + verify forwards) or quadratic (one forward of B*(B+1) tokens)"})
    p.set_defaults(run=cmd_generate)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="answer a chat prompt in all three modes and compare")
    p.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--block-size", type=int, help="default: per device and mode")
    p.set_defaults(run=cmd_demo)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF/NLD directory or a GGUF file to an NLD directory")
    p.add_argument("source", help="HF or NLD checkpoint directory, or a GGUF file")
    p.add_argument("output", help="NLD directory to write")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--mask-token", help="existing token to use as MASK (default: the model's, or an unused "
                                           "special token)")
    mask.add_argument("--add-mask-token", action="store_true", help="grow the vocabulary by a new <|mask|> token")
    p.add_argument("--block-size", type=int, help="diffusion block size recorded in config.json (default: the "
                                                  "model's own, if it has one)")
    p.add_argument("--dtype", choices=loading.DTYPES, default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=4.0, help="maximum size of one safetensors shard")
    p.set_defaults(run=cmd_convert, no_model_args=True)


_TYPES = {"int": int, "float": float, "str": str}


def _options(p: argparse.ArgumentParser, defaults, kinds: dict | None = None, helps: dict | None = None,
             skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a config dataclass, typed by its annotation or ``kinds`` (a parser, a tuple of
    choices, or "append"); tuples are comma-separated, booleans that default to true become --no-flag."""
    kinds, helps = kinds or {}, helps or {}
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        value, flag, h = getattr(defaults, f.name), "--" + f.name.replace("_", "-"), helps.get(f.name)
        # "int | None" -> int; "tuple[float | None, ...]" -> float (the parser of one item)
        kinds.setdefault(f.name, _TYPES.get(str(f.type).removeprefix("tuple[").split("|")[0].split(",")[0].strip(), str))
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


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed and quality of modes and baselines on a prompt set")
    _options(p, bench.Options(), {"thresholds": _threshold}, {
        "prompts": "JSONL prompt set (default: the packaged chat prompts)", "spec_variants": "linear and/or quadratic",
        "baselines": "transformers generate baselines: hf, hf-lookup (prompt lookup), or none",
        "humaneval": "HumanEval problems to score (0 = skip)", "sweep": "skip the forward-latency sweep",
        "out": "folder for the JSON results and PNG plots"})
    p.set_defaults(run=cmd_bench)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a draft adapter (or all weights) on the joint objective")
    p.add_argument("--data", nargs="+", required=True, help="text/code files, folders, or chat JSONL files")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt and the trained adapter or model")
    p.add_argument("--until", type=int, help="stop (with a checkpoint) at this step of the schedule")
    p.add_argument("--seq-len", type=int, default=DataConfig(()).seq_len)
    _options(p, TrainConfig(), {"regime": REGIMES, "autocast": ("auto", "bf16", "off")},
             {"block_size": "default: the model's training block size, else 32", "alpha": "weight of the diffusion "
              "term", "suffix_fraction": "share of sequences masked like a spec draft"})
    p.set_defaults(run=cmd_train)


def _distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="write the model's own greedy answers to generated prompts as chat JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=512, help="how many prompts")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=distill.SOURCES, default="mixed",
                   help="mixed: stdlib questions and templated requests; magpie: requests the model writes itself")
    p.set_defaults(run=cmd_distill)


def _adapter_parsers(sub) -> None:
    x = sub.add_parser("export-adapter", help="write the model's draft adapter (see --adapter) as a PEFT folder")
    x.add_argument("out", help="folder to write")
    x.add_argument("--adapter-dtype", choices=loading.DTYPES, default="bfloat16", help="dtype of the written weights")
    x.set_defaults(run=cmd_export_adapter)
    e = sub.add_parser("eval-draft", help="held-out spec accepted length and diffusion quality of a draft adapter")
    e.add_argument("--prompts", help="JSONL prompt set (default: the packaged chat prompts)")
    e.add_argument("--modes", type=_list(str), default=("ar", "spec", "diffusion"))
    e.add_argument("--block-sizes", type=_list(int), default=(8,))
    e.add_argument("--spec-variants", type=_list(str), default=("linear",))
    e.add_argument("--threshold", type=_threshold, default=0.9)
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--snapshots", help="a training run's adapters/ folder: evaluate the bare model and every step-N "
                                       "adapter in it (one JSON line each: the acceptance curve)")
    e.add_argument("--plot", help="with --snapshots: write accepted length vs training tokens to this PNG")
    e.set_defaults(run=cmd_eval_draft)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--block-size", type=int, help="block size of requests that name none (default: per device "
                                                  "and mode)")
    _options(p, ServerConfig(), {"default_mode": (*MODES, "auto")}, {
        "served_model_name": "the model id clients send (default: from --model)",
        "api_key": "require 'Authorization: Bearer KEY'", "max_queue": "requests waiting or running before 429",
        "max_batch": "rows decoded together"}, skip=("defaults",))
    p.set_defaults(run=cmd_serve, served_model_name=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tridlm", description="Tri-mode diffusion language models: ar, diffusion, spec.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_generate_parser, _demo_parser, _convert_parser, _bench_parser, _train_parser, _distill_parser,
                _adapter_parsers, _serve_parser):
        add(sub)
    for p in sub.choices.values():
        if not p.get_default("no_model_args"):
            _model_args(p)
    return parser


def _open(args, adapter: str | None = None):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    model, tok = loading.open_model(args.model, args.dtype, args.device, adapter or args.adapter)
    if args.cuda_graphs:
        from tridlm.graphs import GraphedModel

        model = GraphedModel(model, capacity=args.cuda_graphs)
    return model, tok


def cmd_generate(args) -> None:
    cfg = _fill(GenerationConfig, args)
    model, tok = _open(args)
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    text = TextStream(tok, cfg.stop)
    on_tokens = (lambda _, t: print(text.push(t), end="", flush=True)) if args.stream else None
    state = generate(model, [ids], cfg, detokenize=tok.decode, on_tokens=on_tokens)
    if args.stream:
        print(text.push([], final=True))
    elif args.json:
        row = state.rows[0]
        print(json.dumps({"text": state.text(0), "tokens": row.tokens, "finish_reason": row.finish_reason,
                          "prompt_tokens": len(ids), "accepted_lengths": row.accepted_lengths,
                          "block_size": state.cfg.block_size, **state.stats()}))
    else:
        print(state.text(0))


def cmd_demo(args) -> None:
    demo.run(*_open(args), args.prompt, args.max_tokens, args.block_size)


def cmd_convert(args) -> None:
    print(loading.convert(args.source, args.output, args.dtype, args.mask_token, args.add_mask_token, args.block_size,
                          args.shard_gb))


def cmd_bench(args) -> None:
    opts = _fill(bench.Options, args)
    bench.run_suite(*_open(args), opts, args.model, "tridlm " + " ".join(sys.argv[1:]))


def cmd_train(args) -> None:
    cfg = _fill(TrainConfig, args)
    with distributed(args.device):
        torch.manual_seed(cfg.seed)
        model, tok = _open(args)
        trainer = Trainer(model, tok, DataConfig(tuple(args.data), seq_len=args.seq_len), cfg, Path(args.out))
        result = trainer.train(until=args.until)
        if trainer.rank == 0:
            print(json.dumps({"step": trainer.step, **result}))


def cmd_distill(args) -> None:
    model, tok = _open(args)
    prompts = distill.prompts_from(args.source, model, tok, args.prompts, args.batch, args.seed)
    count = distill.distill(model, tok, prompts, Path(args.out), args.batch, args.max_tokens)
    print(json.dumps({"out": args.out, "records": count}))


def cmd_export_adapter(args) -> None:
    model, _ = _open(args)
    if not checkpoint.has_adapter(model):
        raise ValueError("the model has no draft adapter to export (pass --adapter FOLDER)")
    checkpoint.save_adapter(model, Path(args.out), loading.DTYPES[args.adapter_dtype])
    print(json.dumps({"out": args.out, "dtype": args.adapter_dtype}))


def cmd_eval_draft(args) -> None:
    if args.snapshots and args.adapter:
        raise ValueError("--snapshots evaluates the bare model and each snapshot; leave out --adapter")
    model, tok = _open(args, adapter="none" if args.snapshots else None)
    prompts = bench.load_prompts(args.prompts, tok)
    settings = bench.grid(args.modes, args.block_sizes, [args.threshold], [0.0], [1], args.max_tokens,
                          spec_variants=args.spec_variants)
    if args.snapshots:
        bench.acceptance_curve(model, prompts, settings, Path(args.snapshots), args.plot)
    else:
        print(json.dumps({"adapter": args.adapter, "prompts": len(prompts), **bench.eval_draft(model, prompts, settings)}))


def cmd_serve(args) -> None:
    import uvicorn

    from tridlm.serve.app import create_app

    config = _fill(ServerConfig, args, served_model_name=args.served_model_name or loading.model_name(args.model),
                   defaults=GenerationConfig(block_size=args.block_size).validate())
    uvicorn.run(create_app(*_open(args), config), host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tridlm: error: {e}", file=sys.stderr)
        sys.exit(2)
