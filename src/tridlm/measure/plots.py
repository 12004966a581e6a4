"""Plots of bench and eval-draft results (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path


def bench(report: dict, prefix: Path) -> list[Path]:
    """Speed and TPF bars, quality vs parallelism, and the accepted-length histogram of a bench report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = list(res)
    paths = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.barh(
        names,
        [res[n]["tok_s"] for n in names],
        xerr=[
            [res[n]["tok_s"] - res[n]["tok_s_min"] for n in names],
            [res[n]["tok_s_max"] - res[n]["tok_s"] for n in names],
        ],
        color="tab:blue",
    )
    a.set_xlabel("tokens/s (median, min-max over repeats)")
    a.invert_yaxis()
    b.barh(names, [res[n]["tpf"] or 0 for n in names], color="tab:green")
    b.set_xlabel("tokens per forward (TPF)")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.suptitle(f"{report['machine']['device']}, {report['machine']['dtype']}")
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "-speed.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n in names:
        if res[n]["tpf"] and res[n]["gen_ppl"]:
            ax.scatter(res[n]["tpf"], res[n]["gen_ppl"])
            ax.annotate(n, (res[n]["tpf"], res[n]["gen_ppl"]), fontsize=7)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("generative perplexity under AR (lower is better)")
    ax.set_yscale("log")
    ax.set_title("quality vs parallelism")
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "-quality.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    spec = [n for n in names if res[n]["accepted_hist"]]
    if spec:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        _accepted_bars(ax, {n: res[n]["accepted_hist"] for n in spec})
        ax.set_xlabel("tokens accepted per draft+verify cycle")
        fig.tight_layout()
        paths.append(prefix.with_name(prefix.name + "-accepted.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _accepted_bars(ax, hists: dict[str, dict]) -> None:
    """Side-by-side bars of each setting's accepted-length histogram, as fractions of its cycles."""
    width = 0.8 / len(hists)
    for i, (name, hist) in enumerate(hists.items()):
        hist = {int(k): v for k, v in hist.items()}
        total = sum(hist.values())
        ax.bar([k + i * width for k in hist], [v / total for v in hist.values()], width, label=name)
    ax.set_xticks(sorted({int(k) for h in hists.values() for k in h}))
    ax.set_ylabel("fraction of cycles")
    ax.legend(fontsize=7)


def accepted_histograms(results: dict[str, dict[str, dict]], path: Path) -> Path:
    """One panel per precision and prompt class of ``bench/spec_ablation.py``: the accepted-length
    histogram of every speculative setting (tokens per cycle; a pipelined cycle is one forward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(prec, cls, r) for prec, classes in results.items() for cls, r in classes.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (prec, cls, r) in zip(axes[0], panels):
        _accepted_bars(ax, {s["setting"]: s["accepted_hist"] for s in r["settings"] if s["accepted_hist"]})
        ax.set_title(f"{prec}, {cls} prompts")
        ax.set_xlabel("tokens per cycle (one forward; two in spec linear)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def acceptance_curve(curve: list[dict], path: Path) -> None:
    """Mean accepted length per spec setting vs training tokens, from ``eval-draft --snapshots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    names = [n for n, r in curve[0].items() if isinstance(r, dict) and r.get("accepted_mean")]
    for n in names:
        ax.plot([c["tokens"] / 1e6 for c in curve], [c[n]["accepted_mean"] for c in curve], marker="o", label=n)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("mean tokens per draft+verify cycle")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_frontier(report: dict[str, list[dict]], path: Path) -> Path:
    """Task score against tokens per forward, one panel per task: the price each mode pays for its
    parallelism (``bench/eval_table.py``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(6 * len(report), 4.5), squeeze=False)
    for ax, (task, runs) in zip(axes[0], report.items()):
        colours = {"ar": "tab:gray", "spec": "tab:blue", "auto": "tab:green", "diffusion": "tab:orange"}
        for r in runs:
            ax.scatter(r["tpf"], 100 * r["pass@1"], color=colours[r["mode"]])
        # AR's points sit at one token per forward: listed in the corner instead; the others' labels
        # alternate above and below their points along each score, so neighbours do not overwrite each other.
        labelled = sorted((r for r in runs if r["mode"] != "ar"), key=lambda r: (r["pass@1"], r["tpf"]))
        for i, r in enumerate(labelled):
            i = sum(o["pass@1"] == r["pass@1"] for o in labelled[:i])  # index among the same score
            label = r["setting"] if r["precision"] == "int4" else f"{r['setting']} {r['precision']}"
            ax.annotate(
                label,
                (r["tpf"], 100 * r["pass@1"]),
                fontsize=7,
                xytext=(4, 5 if i % 2 == 0 else -11),
                textcoords="offset points",
            )
        ax.text(
            0.98,
            0.02,
            "ar (TPF 1):\n"
            + "\n".join(f"{r['precision']} {100 * r['pass@1']:.1f}%" for r in runs if r["mode"] == "ar"),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="tab:gray",
        )
        ax.set_ylim(bottom=-0.05 * max(100 * r["pass@1"] for r in runs))  # room for labels below zero
        ax.set_xlim(right=max(r["tpf"] for r in runs) + 0.4)  # room for the labels and the AR list
        diffusion = sorted((r["tpf"], 100 * r["pass@1"]) for r in runs if r["mode"] == "diffusion")
        if diffusion:
            ax.plot(*zip(*diffusion), color="tab:orange", alpha=0.5)
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel("pass@1 (%)")
        ax.set_title(f"{task}, {runs[0]['total']} problems, greedy (int4 unless named)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
