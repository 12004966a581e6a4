"""Command line: ``tridlm generate``, ``tridlm convert`` and ``tridlm demo``. Argument parsing lives here only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from tridlm import checkpoint, gguf_file
from tridlm.device import default_block_size, fast_dtype
from tridlm.decode import MODES, SPEC_VARIANTS, DecodeState, GenerationConfig, stream
from tridlm.tokenizer import TextStream
from tridlm.train.data import DataConfig
from tridlm.train.loop import REGIMES, TrainConfig, Trainer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"tridlm: error: {message}\n")


def _threshold(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _list(kind):
    def parse(value: str) -> list:
        return [kind(v) for v in value.split(",") if v]
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="NLD or Hugging Face checkpoint directory, or a GGUF file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=(*DTYPES, "auto"), default="float32",
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16/amx_bf16), else float32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--adapter", help="draft adapter folder (PEFT layout), or 'none' for the bare model (default: the "
                                     "model's own linear_spec_lora/, or the shipped one of the default model)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--cuda-graphs", type=int, metavar="CAPACITY", default=0,
                   help="replay per-cycle forwards as CUDA graphs over a static cache of CAPACITY tokens")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    d = GenerationConfig()
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--block-size", type=int, help="default: chosen per device and mode (tridlm.device.BLOCK_SIZES)")
    p.add_argument("--threshold", type=_threshold, default=d.threshold, help="diffusion confidence, or 'none'")
    p.add_argument("--spec-variant", choices=SPEC_VARIANTS, default=d.spec_variant,
                   help="spec: linear (draft + verify forwards) or quadratic (one forward of B*(B+1) tokens)")
    p.add_argument("--max-steps-per-block", type=int)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tridlm", description="Tri-mode diffusion language models: ar, diffusion, spec.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    out = gen.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as tokens are committed")
    out.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and counts")
    _add_decode_args(gen)
    _add_model_args(gen)
    demo = sub.add_parser("demo", help="answer a chat prompt in all three modes and compare")
    demo.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--block-size", type=int, help="default: chosen per device and mode")
    _add_model_args(demo)
    conv = sub.add_parser("convert", help="convert an HF/NLD directory or a GGUF file to an NLD directory")
    conv.add_argument("source", help="HF or NLD checkpoint directory, or a GGUF file")
    conv.add_argument("output", help="NLD directory to write")
    mask = conv.add_mutually_exclusive_group()
    mask.add_argument("--mask-token", help="existing token to use as MASK (default: the model's, or an unused "
                                           "special token)")
    mask.add_argument("--add-mask-token", action="store_true", help="grow the vocabulary by a new <|mask|> token")
    conv.add_argument("--block-size", type=int, default=32, help="block size recorded in config.json")
    conv.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    conv.add_argument("--shard-gb", type=float, default=4.0, help="maximum size of one safetensors shard")
    b = sub.add_parser("bench", help="speed and quality of modes and baselines on a prompt set")
    b.add_argument("--prompts", help="JSONL prompt set (default: the packaged chat prompts)")
    b.add_argument("--modes", type=_list(str), default=["ar", "spec", "diffusion"])
    b.add_argument("--block-sizes", type=_list(int), default=[4, 16])
    b.add_argument("--thresholds", type=_list(_threshold), default=[0.9, 0.5])
    b.add_argument("--spec-variants", type=_list(str), default=["linear"], help="linear and/or quadratic")
    b.add_argument("--temperatures", type=_list(float), default=[0.0])
    b.add_argument("--batch-sizes", type=_list(int), default=[1])
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--baselines", type=_list(str), default=["hf", "hf-lookup"],
                   help="transformers generate baselines: hf, hf-lookup (prompt lookup), or none")
    b.add_argument("--humaneval", type=int, default=0, help="HumanEval problems to score (0 = skip)")
    b.add_argument("--humaneval-modes", type=_list(str), default=["ar", "diffusion"])
    b.add_argument("--humaneval-max-tokens", type=int, default=256)
    b.add_argument("--no-sweep", action="store_true", help="skip the forward-latency-vs-block-size sweep")
    b.add_argument("--out", default="bench/results", help="folder for the JSON results and PNG plots")
    _add_model_args(b)
    t = sub.add_parser("train", help="train a draft adapter (or all weights) on the joint AR + diffusion objective")
    t.add_argument("--data", nargs="+", required=True, help="text/code files, folders, or chat JSONL files")
    t.add_argument("--out", required=True, help="folder for checkpoint.pt and the trained adapter or model")
    td = TrainConfig()
    t.add_argument("--regime", choices=REGIMES, default=td.regime)
    t.add_argument("--steps", type=int, default=td.steps, help="length of the learning-rate schedule")
    t.add_argument("--until", type=int, help="stop (with a checkpoint) at this step of the schedule; rerun with a "
                   "later --until, or none, to go on")
    t.add_argument("--batch-size", type=int, default=td.batch_size)
    t.add_argument("--grad-accum", type=int, default=td.grad_accum)
    t.add_argument("--seq-len", type=int, default=DataConfig(()).seq_len)
    t.add_argument("--block-size", type=int, default=td.block_size)
    t.add_argument("--alpha", type=float, default=td.alpha, help="weight of the diffusion term")
    t.add_argument("--suffix-fraction", type=float, default=td.suffix_fraction,
                   help="share of sequences masked like a spec draft (each block from a random cut on)")
    t.add_argument("--lr", type=float, default=td.lr)
    t.add_argument("--warmup-steps", type=int, default=td.warmup_steps)
    t.add_argument("--lora-rank", type=int, default=td.lora_rank)
    t.add_argument("--lora-alpha", type=float, default=td.lora_alpha)
    t.add_argument("--lora-targets", type=_list(str), default=list(td.lora_targets))
    t.add_argument("--eval-every", type=int, default=td.eval_every)
    t.add_argument("--checkpoint-every", type=int, default=td.checkpoint_every)
    t.add_argument("--seed", type=int, default=td.seed)
    t.add_argument("--autocast", choices=("auto", "bf16", "off"), default=td.autocast)
    _add_model_args(t)
    ds = sub.add_parser("distill", help="write the model's own greedy answers to generated prompts as chat JSONL")
    ds.add_argument("--out", required=True)
    ds.add_argument("--prompts", type=int, default=512, help="how many prompts")
    ds.add_argument("--batch", type=int, default=16)
    ds.add_argument("--max-tokens", type=int, default=128)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--source", choices=("mixed", "magpie"), default="mixed",
                    help="mixed: stdlib questions and templated requests; magpie: requests the model writes itself")
    _add_model_args(ds)
    x = sub.add_parser("export-adapter", help="write the model's draft adapter (see --adapter) as a PEFT folder")
    x.add_argument("out", help="folder to write")
    x.add_argument("--adapter-dtype", choices=DTYPES, default="bfloat16", help="dtype of the written weights")
    _add_model_args(x)
    e = sub.add_parser("eval-draft", help="held-out spec accepted length and diffusion quality of a draft adapter")
    e.add_argument("--prompts", help="JSONL prompt set (default: the packaged chat prompts)")
    e.add_argument("--modes", type=_list(str), default=["ar", "spec", "diffusion"])
    e.add_argument("--block-sizes", type=_list(int), default=[8])
    e.add_argument("--spec-variants", type=_list(str), default=["linear"])
    e.add_argument("--threshold", type=_threshold, default=0.9)
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--snapshots", help="a training run's adapters/ folder: evaluate the bare model and every "
                                       "step-N adapter in it (one JSON line each: the acceptance curve)")
    e.add_argument("--plot", help="with --snapshots: write accepted length vs training tokens to this PNG")
    _add_model_args(e)
    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--served-model-name", help="the model id clients send (default: from --model)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before 429")
    srv.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    srv.add_argument("--default-mode", choices=(*MODES, "auto"), default="ar")
    srv.add_argument("--block-size", type=int, help="block size of requests that name none (default: chosen per "
                                                    "device and mode)")
    _add_model_args(srv)
    return parser


def _block(args, mode: str, variant: str) -> int:
    return args.block_size if args.block_size is not None else default_block_size(args.device, mode, variant)


def _config(args) -> GenerationConfig:
    return GenerationConfig(mode=args.mode, block_size=_block(args, args.mode, args.spec_variant),
                            threshold=args.threshold,
                            spec_variant=args.spec_variant,
                            max_steps_per_block=args.max_steps_per_block, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens,
                            stop=tuple(args.stop)).validate()


def load_model(path: str | None, dtype: torch.dtype, device: str = "cpu", adapter: str | None = None):
    """A model and tokenizer from a checkpoint directory, a GGUF file, or the embedded default.
    adapter: a PEFT folder to attach instead of the model's own, or "none" for no adapter."""
    own = adapter is None
    if path is None:
        model, tok = gguf_file.load_default(dtype, device, adapter=own)
    elif Path(path).is_file() and path.endswith(".gguf"):
        model, tok = gguf_file.load_gguf(Path(path), dtype)
        model = model.to(device)
    else:
        model, tok = checkpoint.load(Path(path), dtype, device, adapter=own)
    if adapter not in (None, "none"):
        checkpoint.load_adapter(model, Path(adapter))
    return model, tok


def resolve_dtype(name: str, device: str) -> torch.dtype:
    return fast_dtype(device) if name == "auto" else DTYPES[name]


def _load(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    model, tok = load_model(args.model, resolve_dtype(args.dtype, args.device), args.device, args.adapter)
    if args.cuda_graphs:
        from tridlm.graphs import GraphedModel

        model = GraphedModel(model, capacity=args.cuda_graphs)
    return model, tok


def _run(model, tok, prompt_ids, cfg, on_tokens=None) -> DecodeState:
    state = DecodeState(1, cfg, model.cfg.eos_ids, tok.decode)
    for chunk in stream(model, [prompt_ids], cfg, state=state):
        if on_tokens:
            for _, tokens in chunk:
                on_tokens(tokens)
    return state


def cmd_generate(args) -> None:
    cfg = _config(args)
    model, tok = _load(args)
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    if args.stream:
        text = TextStream(tok, cfg.stop)
        state = _run(model, tok, ids, cfg, lambda t: print(text.push(t), end="", flush=True))
        print(text.push([], final=True))
        return
    state = _run(model, tok, ids, cfg)
    row, stats = state.rows[0], state.stats()
    if not args.json:
        print(state.text(0))
        return
    print(json.dumps({
        "text": state.text(0), "tokens": row.tokens, "finish_reason": row.finish_reason,
        "prompt_tokens": len(ids), "accepted_lengths": row.accepted_lengths, "block_size": cfg.block_size, **stats,
    }))


def cmd_demo(args) -> None:
    model, tok = _load(args)
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    runs = {"ar": ("ar", "linear"), "diffusion": ("diffusion", "linear"), "spec": ("spec", "linear"),
            "spec-quad": ("spec", "quadratic")}
    configs = {name: GenerationConfig(mode=mode, spec_variant=variant, max_tokens=args.max_tokens,
                                      block_size=_block(args, mode, variant))
               for name, (mode, variant) in runs.items()}
    print(f"prompt: {args.prompt!r} ({len(ids)} tokens), greedy, draft adapter: "
          f"{'yes' if checkpoint.has_adapter(model) else 'none'}\n")
    _run(model, tok, ids, configs["ar"].replace(max_tokens=4))  # warm-up: first-call allocations
    results = {name: _run(model, tok, ids, cfg.validate()) for name, cfg in configs.items()}
    ar_tokens = results["ar"].rows[0].tokens
    print(f"{'mode':<10} {'block':>5} {'tokens':>6} {'NFE':>5} {'TPF':>5} {'tok/s':>7} {'= AR':>5}")
    for name, state in results.items():
        s = state.stats()
        same = "yes" if state.rows[0].tokens == ar_tokens else "no"
        block = configs[name].block_size if name != "ar" else "-"
        print(f"{name:<10} {block:>5} {s['completion_tokens']:>6} {s['nfe']:>5} {s['tpf']:>5.2f} {s['tok_s']:>7.1f} "
              f"{same:>5}")
    for name, state in results.items():
        print(f"\n[{name}] {state.text(0)}")


def cmd_convert(args) -> None:
    if args.block_size < 1:
        raise ValueError(f"invalid block_size={args.block_size}: expected a positive integer")
    model, tok = load_model(args.source, DTYPES[args.dtype])
    if args.add_mask_token:
        model = checkpoint.add_mask_token(model, tok)
    elif args.mask_token:
        model.cfg = dataclasses.replace(model.cfg, mask_id=tok.token_id(args.mask_token))
    elif model.cfg.mask_id is None:
        raise ValueError(f"{args.source}: no mask token and no unused special token to reuse; "
                         "pass --mask-token TOKEN or --add-mask-token")
    checkpoint.save(Path(args.output), model, tok, block_size=args.block_size,
                    max_shard_bytes=int(args.shard_gb * 2**30))
    mask = tok.backend.id_to_token(model.cfg.mask_id)
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.dtype}, mask token {mask!r} (id {model.cfg.mask_id})")


def cmd_bench(args) -> None:
    import datetime

    from tridlm import bench

    bad = (set(args.baselines) - {"hf", "hf-lookup", "none"} or set(args.modes) - set(MODES)
           or set(args.spec_variants) - set(SPEC_VARIANTS))
    if bad:
        raise ValueError(f"unknown mode, spec variant or baseline {sorted(bad)}")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    model, tok = _load(args)
    settings = bench.grid(args.modes, args.block_sizes, args.thresholds, args.temperatures, args.batch_sizes,
                          args.max_tokens, args.spec_variants)
    if "ar" not in args.modes:  # the reference for exact match and speedups
        settings.insert(0, bench.grid(["ar"], [1], [None], [0.0], [1], args.max_tokens)[0])
    baselines = [b for b in args.baselines if b != "none"]
    hf = bench.load_hf_baseline(args.model, model.dtype, args.device) if baselines else None
    greedy = GenerationConfig(max_tokens=args.max_tokens)
    settings += [bench.Setting(b, greedy) for b in baselines]
    he_settings = [dataclasses.replace(s, gen=s.gen.replace(max_tokens=args.humaneval_max_tokens))
                   for s in settings if s.engine == "tridlm" and s.gen.mode in args.humaneval_modes
                   and s.gen.temperature == 0 and s.batch_size == 1]
    runner = bench.Bench(model, tok, settings, bench.load_prompts(args.prompts, tok), repeats=args.repeats, hf=hf,
                         humaneval=args.humaneval, humaneval_settings=he_settings, sweep=not args.no_sweep)
    report = bench.finalize(runner.run())
    report["command"] = "tridlm " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"bench-{datetime.date.today().isoformat()}"
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    images = bench.plots(report, prefix)
    print()
    print(bench.table(report))
    print(f"\nwrote {prefix.with_suffix('.json')} and {', '.join(str(p) for p in images)}")
    print(json.dumps(report))


def cmd_train(args) -> None:
    import os

    import torch.distributed as dist

    cfg = TrainConfig(regime=args.regime, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_targets=tuple(args.lora_targets), block_size=args.block_size, alpha=args.alpha,
                      suffix_fraction=args.suffix_fraction,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_steps=args.warmup_steps, steps=args.steps, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, autocast=args.autocast).validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        dist.init_process_group("nccl" if torch.device(args.device).type == "cuda" else "gloo")
    try:
        torch.manual_seed(cfg.seed)
        model, tok = _load(args)
        trainer = Trainer(model, tok, DataConfig(tuple(args.data), seq_len=args.seq_len), cfg, Path(args.out))
        result = trainer.train(until=args.until)
        if trainer.rank == 0:
            print(json.dumps({"step": trainer.step, **result}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cmd_distill(args) -> None:
    from tridlm.train.distill import distill, heldout_requests, magpie_prompts, mixed_prompts

    model, tok = _load(args)
    if args.source == "magpie":
        prompts = magpie_prompts(model, tok, args.prompts, args.batch, args.seed, exclude=heldout_requests())
    else:
        prompts = mixed_prompts(args.prompts, args.seed)
    n = distill(model, tok, prompts, Path(args.out), args.batch, args.max_tokens)
    print(json.dumps({"out": args.out, "records": n}))


def cmd_export_adapter(args) -> None:
    model, _ = _load(args)
    if not checkpoint.has_adapter(model):
        raise ValueError("the model has no draft adapter to export (pass --adapter FOLDER)")
    checkpoint.save_adapter(model, Path(args.out), DTYPES[args.adapter_dtype])
    print(json.dumps({"out": args.out, "dtype": args.adapter_dtype}))


def cmd_eval_draft(args) -> None:
    from tridlm import bench

    if args.snapshots:
        if args.adapter:
            raise ValueError("--snapshots evaluates the bare model and each snapshot; leave out --adapter")
        args.adapter = "none"
    model, tok = _load(args)
    prompts = bench.load_prompts(args.prompts, tok)
    settings = bench.grid(args.modes, args.block_sizes, [args.threshold], [0.0], [1], args.max_tokens,
                          spec_variants=args.spec_variants)
    if not args.snapshots:
        print(json.dumps({"adapter": args.adapter, "prompts": len(prompts), **bench.eval_draft(model, prompts, settings)}))
        return
    snapshots = sorted(Path(args.snapshots).glob("step-*"))
    if not snapshots:
        raise FileNotFoundError(f"no step-N adapter folders under {args.snapshots}")
    curve = []
    for snap in [None, *snapshots]:
        if snap is not None:
            checkpoint.load_adapter(model, snap)
        progress = json.loads((snap / "progress.json").read_text()) if snap else {"step": 0, "tokens": 0}
        point = {**progress, "adapter": str(snap) if snap else None, **bench.eval_draft(model, prompts, settings)}
        curve.append(point)
        print(json.dumps(point), flush=True)
    if args.plot:
        bench.plot_curve(curve, Path(args.plot))


def cmd_serve(args) -> None:
    import uvicorn

    from tridlm.serve.app import ServerConfig, create_app

    if args.block_size is not None:
        GenerationConfig(block_size=args.block_size).validate()
    if args.max_queue < 1 or args.max_batch < 1:
        raise ValueError("--max-queue and --max-batch must be positive")
    model, tok = _load(args)
    name = args.served_model_name or (Path(args.model).name if args.model else gguf_file.DEFAULT_NAME.split(".")[0])
    config = ServerConfig(model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                          max_batch=args.max_batch, default_mode=args.default_mode, block_size=args.block_size)
    uvicorn.run(create_app(model, tok, config), host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "demo": cmd_demo, "convert": cmd_convert, "bench": cmd_bench,
                    "train": cmd_train, "distill": cmd_distill, "export-adapter": cmd_export_adapter,
                    "eval-draft": cmd_eval_draft, "serve": cmd_serve}
        commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tridlm: error: {e}", file=sys.stderr)
        sys.exit(2)
