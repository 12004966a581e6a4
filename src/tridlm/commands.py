"""What each command does, given its parsed arguments (an ``argparse.Namespace``): one function per command, named
with its flags in ``cli.COMMANDS``.

Each function imports what it needs when it runs, so ``tridlm serve`` never loads the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def _fill(cls, args, **extra):
    """A config dataclass from the parsed arguments of the same names (lists become tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **extra}).validate()


def _open(args, **override):
    from tridlm import loading

    return _fill(loading.Source, args, **override).open()


def _open_float(args, **override):
    """For commands that train or measure the draft adapter: float weights (float32 unless --dtype says)."""
    return _open(args, dtype=args.dtype or "float32", **override)


def generate(args) -> None:
    from tridlm.decode import CostCurve, GenerationConfig, generate
    from tridlm.tokenizer import TextStream

    cfg = _fill(GenerationConfig, args)
    model, tok = _open(args)
    cfg = cfg.replace(grammar=_grammar(args, model, tok))
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    text = TextStream(tok, cfg.stop)
    on_tokens = (lambda _, t: print(text.push(t), end="", flush=True)) if args.stream else None
    costs = None
    if cfg.row.plans:
        costs, origin = CostCurve.kept(model, cfg.resolve(model).block_size)
        print(f"tridlm: auto plans with {origin}", file=sys.stderr)
    state = generate(model, [ids], cfg, detokenize=tok.decode, on_tokens=on_tokens, costs=costs)
    if args.stream:
        print(text.push([], final=True))
    elif args.json:
        row = state.rows[0]
        print(
            json.dumps(
                {
                    "text": state.text(0),
                    "tokens": row.tokens,
                    "finish_reason": row.finish_reason,
                    "prompt_tokens": len(ids),
                    "accepted_lengths": row.accepted_lengths,
                    "block_size": state.cfg.block_size,
                    **state.stats(),
                }
            )
        )
    else:
        print(state.text(0))


def _grammar(args, model, tok):
    """The structured output ``generate``'s flags ask for, compiled (a ``GrammarError`` names what is wrong with it);
    None: free text."""
    from tridlm.grammar import Grammars

    flags = {"json_schema": args.json_schema, "json_object": args.json_object, "regex": args.regex, "lark": args.lark}
    kind = next((k for k, v in flags.items() if v), None)
    if kind is None:
        return None
    source = None if kind == "json_object" else flags[kind]
    if kind == "lark" or (kind == "json_schema" and not source.lstrip().startswith("{")):
        source = Path(source).read_text()  # a file (FileNotFoundError names it)
    return Grammars(tok, model.cfg.vocab_size, model.cfg.eos_ids).compile(kind, source)


def eval_task(args) -> None:
    from tridlm import loading
    from tridlm.decode import GenerationConfig
    from tridlm.measure import evaluate

    gen, opts = _fill(GenerationConfig, args), _fill(evaluate.EvalOptions, args)
    source = _fill(loading.Source, args)
    model, tok = source.open()
    precision = str(model.dtype).removeprefix("torch.") if source.dtype == "auto" else source.dtype
    settings = evaluate.run_settings(
        args.task, model, loading.model_name(args.model), precision, args.adapter, gen, opts.batch_size
    )
    if args.task in evaluate.TASKS:
        result = evaluate.evaluate(model, tok, args.task, gen, opts, settings)
        print(json.dumps(result) if args.json else evaluate.describe(result))
        return
    from tridlm.measure import lmeval

    result = lmeval.run(args.task, model, tok, gen, settings, opts.validate())
    print(json.dumps(result) if args.json else lmeval.describe(result))


def lm_eval_cli(args) -> None:
    import sys

    from lm_eval.__main__ import cli_evaluate

    import tridlm.measure.lmeval  # noqa: F401  (registers the tridlm model)
    from tridlm.measure import suite_data

    include = [] if "--include_path" in args.args else ["--include_path", str(suite_data.write_tasks())]
    sys.argv = ["lm-eval", *args.args, *include]
    cli_evaluate()


def demo(args) -> None:
    from tridlm import demo

    demo.run(*_open(args), args.prompt, args.max_tokens, args.block_size)


def convert(args) -> None:
    from tridlm import loading

    print(
        loading.convert(
            None if args.source == "default" else args.source,
            args.output,
            args.dtype,
            args.mask_token,
            args.add_mask_token,
            args.block_size,
            args.shard_gb,
            args.force,
        )
    )


def bench(args) -> None:
    from tridlm.measure import suite

    opts = _fill(suite.Options, args)
    suite.run_suite(*_open(args), opts, args.model, "tridlm " + " ".join(sys.argv[1:]))


def train(args) -> None:
    import torch

    from tridlm.train.data import DataConfig
    from tridlm.train.loop import TrainConfig, Trainer, distributed

    cfg = _fill(TrainConfig, args)
    with distributed(args.device):
        torch.manual_seed(cfg.seed)
        model, tok = _open_float(args)
        trainer = Trainer(model, tok, DataConfig(tuple(args.data), seq_len=args.seq_len), cfg, Path(args.out))
        result = trainer.train(until=args.until)
        if trainer.rank == 0:
            print(json.dumps({"step": trainer.step, **result}))


def distill(args) -> None:
    from tridlm.train import distill

    model, tok = _open_float(args)
    prompts = distill.prompts_from(args.source, model, tok, args.prompts, args.batch, args.seed)
    count = distill.distill(model, tok, prompts, Path(args.out), args.batch, args.max_tokens)
    print(json.dumps({"out": args.out, "records": count}))


def export_adapter(args) -> None:
    from tridlm import checkpoint, loading

    checkpoint.save_adapter(_open_float(args)[0], Path(args.out), loading.DTYPES[args.adapter_dtype])
    print(json.dumps({"out": args.out, "dtype": args.adapter_dtype}))


def eval_draft(args) -> None:
    from tridlm.measure import draft_eval

    opts = _fill(draft_eval.DraftOptions, args)
    if opts.snapshots and args.adapter:
        raise ValueError("--snapshots evaluates the bare model and each snapshot; leave out --adapter")
    draft_eval.run_draft_eval(*_open_float(args, adapter="none" if opts.snapshots else args.adapter), opts)


def serve(args) -> None:
    from tridlm import loading
    from tridlm.decode import CostCurve, GenerationConfig
    from tridlm.serve import app
    from tridlm.serve.config import ServerConfig

    keys = tuple(args.api_key) + (read_key_file(args.api_key_file) if args.api_key_file else ())
    config = _fill(
        ServerConfig,
        args,
        served_model_name=args.served_model_name or loading.model_name(args.model),
        defaults=GenerationConfig(block_size=args.block_size),
        api_key=keys,
    )
    costs = CostCurve.load(args.cost_curve) if args.cost_curve else None
    app.serve(*_open(args), config, costs)


def read_key_file(path: str) -> tuple[str, ...]:
    keys = tuple(k for line in Path(path).read_text().splitlines() if (k := line.split("#", 1)[0].strip()))
    if not keys:
        raise ValueError(f"{path}: no API key in it (one per line)")
    return keys
