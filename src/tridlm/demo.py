"""``tridlm demo``: one chat prompt answered in every mode, with the counts that tell them apart."""

from __future__ import annotations

from tridlm import checkpoint
from tridlm.decode import CostCurve, DecodeState, GenerationConfig, generate, modes
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer


def run(
    model: TriModel, tokenizer: Tokenizer, prompt: str, max_tokens: int = 96, block_size: int | None = None
) -> dict[str, DecodeState]:
    """Greedy answers in every mode of ``decode.modes`` (block sizes: the defaults unless given; auto's is its
    largest); prints a table of tokens, NFE, TPF, tok/s and whether each equals AR, then the texts."""
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    configs = {
        row.label: GenerationConfig(
            mode=row.mode,
            spec_variant=row.spec_variant,
            max_tokens=max_tokens,
            block_size=block_size if row.mode not in ("ar", "auto") else None,
        )
        for row in modes.TABLE
    }
    print(
        f"prompt: {prompt!r} ({len(ids)} tokens), greedy, draft adapter: "
        f"{'yes' if checkpoint.has_adapter(model) else 'none'}\n"
    )
    costs = CostCurve.for_config(model, configs["auto"])  # measured once, before the timed runs
    for cfg in (configs["ar"], configs["auto"]):  # warm-up: first-call allocations
        generate(model, [ids], cfg.replace(max_tokens=4), costs=costs)
    results = {
        name: generate(model, [ids], cfg, detokenize=tokenizer.decode, costs=costs) for name, cfg in configs.items()
    }
    ar_tokens = results["ar"].rows[0].tokens
    print(f"{'mode':<14} {'block':>5} {'tokens':>6} {'NFE':>5} {'TPF':>5} {'tok/s':>7} {'= AR':>5}")
    for name, state in results.items():
        s = state.stats()
        same = "yes" if state.rows[0].tokens == ar_tokens else "no"
        block = state.cfg.block_size if name != "ar" else "-"
        tpf = "-" if s["tpf"] is None else f"{s['tpf']:.2f}"
        print(f"{name:<14} {block:>5} {s['completion_tokens']:>6} {s['nfe']:>5} {tpf:>5} {s['tok_s']:>7.1f} {same:>5}")
    for name, state in results.items():
        print(f"\n[{name}] {state.text(0)}")
    return results
