"""Training: data packing, exact resume, the adapter regime's AR invariance, learning, and DDP."""

import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tridlm import checkpoint
from tridlm.decode import GenerationConfig, generate
from tridlm.presets import random_model
from tridlm.train.data import DataConfig, PackedData
from tridlm.train.loop import TrainConfig, Trainer

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(40):
        (d / f"doc{i}.txt").write_text(f"the number {i} comes after {i - 1} and before {i + 1}. " * 3)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"count to {i}"},
                {"role": "assistant", "content": " ".join(str(j) for j in range(i))},
            ]
        }
        for i in range(3, 9)
    ]
    (d / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return d


@pytest.fixture
def tok(char_tokenizer):
    return replace(char_tokenizer, chat_template=TEMPLATE)


def test_packing_is_deterministic_and_skips_exactly(corpus, tok):
    data = PackedData(DataConfig((str(corpus),), seq_len=32), tok)
    first = [r for _, r in zip(range(12), data.rows())]
    assert all(t.shape == (32,) and m.shape == (32,) for t, m in first)
    skipped = [r for _, r in zip(range(7), data.rows(skip=5))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[5:], skipped))


def test_chat_loss_mask_covers_assistant_replies_only(tmp_path, tok):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    data = PackedData(DataConfig((str(tmp_path / "c.jsonl"),), seq_len=8, heldout_percent=0.0), tok)
    ids, bearing = next(data.rows())
    text = "user: hi\nassistant: yo\n"
    full = tok.encode(text) + [tok.eos_id]
    assert ids.tolist() == (full * 2)[:8]
    user_len = len(tok.encode("user: hi\n"))
    assert not bearing[:user_len].any() and bearing[user_len : len(full)].all()


def test_heldout_split_is_disjoint(corpus, tok):
    cfg = DataConfig((str(corpus),), seq_len=16, heldout_percent=30.0)
    train = {tuple(t.tolist()) for _, (t, _) in zip(range(60), PackedData(cfg, tok, "train").rows())}
    held = {tuple(t.tolist()) for _, (t, _) in zip(range(20), PackedData(cfg, tok, "heldout").rows())}
    assert train and held and not (train & held)


def small_cfg(**kw):
    return TrainConfig(
        **{
            **dict(
                block_size=4,
                batch_size=2,
                steps=6,
                warmup_steps=2,
                lr=1e-2,
                eval_every=3,
                eval_batches=1,
                checkpoint_every=3,
                lora_rank=4,
                autocast="off",
            ),
            **kw,
        }
    )


def test_resume_after_a_stop_is_exact(corpus, tok, tiny_cfg, tmp_path):
    data = DataConfig((str(corpus),), seq_len=24)
    straight = random_model(tiny_cfg, seed=1, std=0.3)
    torch.manual_seed(0)
    Trainer(straight, tok, data, small_cfg(), tmp_path / "a", log=lambda *_: None).train()

    stopped = random_model(tiny_cfg, seed=1, std=0.3)
    torch.manual_seed(0)
    Trainer(stopped, tok, data, small_cfg(), tmp_path / "b", log=lambda *_: None).train(until=4)
    again = random_model(tiny_cfg, seed=1, std=0.3)  # a fresh process: weights come back from the checkpoint
    trainer = Trainer(again, tok, data, small_cfg(), tmp_path / "b", log=lambda *_: None)
    assert trainer.step == 4
    trainer.train()
    for (n, a), (_, b) in zip(straight.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    assert (tmp_path / "b" / "linear_spec_lora" / "adapter_model.safetensors").is_file()
    snapshots = sorted(p.name for p in (tmp_path / "b" / "adapters").iterdir())
    assert snapshots == ["step-000003", "step-000004", "step-000006"]  # one per checkpoint (and the stop)
    final = load_file(tmp_path / "b" / "adapters" / "step-000006" / "adapter_model.safetensors")
    weights = load_file(tmp_path / "b" / "linear_spec_lora" / "adapter_model.safetensors")
    assert final.keys() == weights.keys()
    assert all(final[k].dtype == torch.bfloat16 and torch.equal(final[k], weights[k].bfloat16()) for k in final)


def test_resume_loads_tensors_only(corpus, tok, tiny_cfg, tmp_path):
    """Resume reads checkpoint.pt with weights_only=True: a pickle that would run code is refused."""
    data = DataConfig((str(corpus),), seq_len=24)
    Trainer(random_model(tiny_cfg), tok, data, small_cfg(steps=3), tmp_path, log=lambda *_: None).train()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # what resume reads loads as plain data
    state["config"]["hook"] = Evil(tmp_path / "pwned")
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        Trainer(random_model(tiny_cfg), tok, data, small_cfg(steps=3), tmp_path, log=lambda *_: None)
    assert not (tmp_path / "pwned").exists()


class Evil:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_other_settings(corpus, tok, tiny_cfg, tmp_path):
    data = DataConfig((str(corpus),), seq_len=24)
    Trainer(random_model(tiny_cfg), tok, data, small_cfg(steps=3), tmp_path, log=lambda *_: None).train()
    with pytest.raises(ValueError, match="other settings"):
        Trainer(random_model(tiny_cfg), tok, data, small_cfg(lr=5e-3), tmp_path, log=lambda *_: None)


def test_adapter_training_learns_and_leaves_ar_bit_identical(corpus, tok, tiny_cfg, tmp_path):
    model = random_model(tiny_cfg, seed=2, std=0.3)
    prompts = [tok.encode("the number 5"), tok.encode("count")]
    ar_before = [r.tokens for r in generate(model, prompts, GenerationConfig(max_tokens=20)).rows]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model,
        tok,
        DataConfig((str(corpus),), seq_len=32),
        small_cfg(steps=40, eval_every=40),
        tmp_path,
        log=lambda *_: None,
    )
    lora_start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    before = trainer.evaluate()
    after = trainer.train()["eval_loss"]
    assert after < before * 0.8  # the diffusion term is learned
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in base.items())  # every base weight untouched
    assert lora_start and all(not torch.equal(now[n], p) for n, p in lora_start.items() if n.endswith("lora_b"))
    assert [r.tokens for r in generate(model, prompts, GenerationConfig(max_tokens=20)).rows] == ar_before
    loaded = random_model(tiny_cfg, seed=2, std=0.3)
    checkpoint.load_adapter(loaded, tmp_path / "linear_spec_lora")
    spec = GenerationConfig(mode="spec", block_size=4, max_tokens=20)
    assert [r.tokens for r in generate(loaded, prompts, spec).rows] == ar_before


def test_full_regime_trains_the_base_weights(corpus, tok, tiny_cfg, tmp_path):
    model = random_model(tiny_cfg, seed=3, std=0.3)
    embed = model.encoder.embed_tokens.weight.detach().clone()
    Trainer(
        model,
        tok,
        DataConfig((str(corpus),), seq_len=24),
        small_cfg(regime="full", steps=2),
        tmp_path,
        log=lambda *_: None,
    ).train()
    assert not torch.equal(model.encoder.embed_tokens.weight, embed)
    assert (tmp_path / "model" / "config.json").is_file()


def test_cli_train_until_stops_inside_the_schedule_and_goes_on(corpus, tok, tiny_model, tmp_path, capsys):
    from tridlm.cli import main

    ckpt = tmp_path / "tiny"
    checkpoint.save(ckpt, tiny_model, tok)
    args = [
        "train",
        "--model",
        str(ckpt),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--block-size",
        "4",
        "--lora-rank",
        "4",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "4",
        "--autocast",
        "off",
    ]
    main([*args, "--until", "2"])
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["sched"]["last_epoch"] == 2  # the 4-step schedule, stopped halfway
    assert sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir()) == ["step-000002"]
    main(args)
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--until", "0"])
    assert "until" in capsys.readouterr().err


@pytest.mark.ddp
def test_two_process_data_parallel_training(corpus, tok, tiny_model, tmp_path):
    ckpt = tmp_path / "tiny"
    checkpoint.save(ckpt, tiny_model, tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tridlm = shutil.which("tridlm", path=str(Path(sys.executable).parent))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        tridlm,
        "train",
        "--model",
        str(ckpt),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--block-size",
        "4",
        "--lora-rank",
        "4",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--autocast",
        "off",
        "--threads",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["rows"] == 3 * 2 * 2  # both processes consumed distinct rows
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 3


def test_eval_draft_reports_acceptance_and_quality(tmp_path, tok, tiny_model, capsys):
    from tridlm.cli import main

    ckpt = tmp_path / "tiny"
    checkpoint.save(ckpt, tiny_model, tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "the end"}\n')
    main(["eval-draft", "--model", str(ckpt), "--prompts", str(prompts), "--block-sizes", "4", "--max-tokens", "12"])
    out = json.loads(capsys.readouterr().out)
    spec, ar, diffusion = out["spec B=4"], out["ar"], out["diffusion B=4 t=0.9"]
    assert spec["tokens"] == ar["tokens"]  # spec is lossless
    hist = {int(k): v for k, v in spec["accepted_hist"].items()}
    assert set(hist) <= {1, 2, 3, 4} and spec["nfe"] == 2 * sum(hist.values())  # draft + verify per cycle
    assert spec["accepted_mean"] == pytest.approx(sum(k * v for k, v in hist.items()) / sum(hist.values()))
    assert ar["nfe"] == ar["tokens"] - 2 and diffusion["tpf"] == pytest.approx(diffusion["tokens"] / diffusion["nfe"])
    assert ar["gen_ppl"] > 1 and diffusion["gen_ppl"] > 1


def test_eval_draft_snapshots_give_the_acceptance_curve(corpus, tok, tiny_cfg, tmp_path, capsys):
    from tridlm.cli import main

    model = random_model(tiny_cfg, seed=2, std=0.3)
    ckpt = tmp_path / "tiny"
    checkpoint.save(ckpt, model, tok)
    Trainer(
        model,
        tok,
        DataConfig((str(corpus),), seq_len=24),
        small_cfg(steps=4, checkpoint_every=2),
        tmp_path / "run",
        log=lambda *_: None,
    ).train()
    capsys.readouterr()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the number"}\n')
    main(
        [
            "eval-draft",
            "--model",
            str(ckpt),
            "--prompts",
            str(prompts),
            "--modes",
            "spec",
            "--block-sizes",
            "4",
            "--max-tokens",
            "10",
            "--snapshots",
            str(tmp_path / "run" / "adapters"),
            "--plot",
            str(tmp_path / "c.png"),
        ]
    )
    curve = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["step"] for c in curve] == [0, 2, 4]
    assert [c["tokens"] for c in curve] == [0, 2 * 2 * 24, 4 * 2 * 24]  # steps x batch rows x seq_len
    assert curve[0]["adapter"] is None and all(c["adapter"].endswith(f"step-{c['step']:06d}") for c in curve[1:])
    # spec is lossless whatever the adapter: every snapshot's tokens are the bare model's; only the cycles differ
    assert len({c["spec B=4"]["tokens"] for c in curve}) == 1
    assert all(c["spec B=4"]["nfe"] == 2 * sum(c["spec B=4"]["accepted_hist"].values()) for c in curve)
    assert (tmp_path / "c.png").stat().st_size > 0


def test_adapter_flag_and_export(tmp_path, tok, tiny_model, capsys):
    """--adapter DIR attaches that adapter, --adapter none drops the model's own, export-adapter casts."""
    from tridlm.cli import main
    from tridlm.loading import open_model

    with_adapter = random_model(tiny_model.cfg, seed=5, std=0.3)
    with_adapter.add_lora(rank=2, alpha=4, targets=("q_proj",))
    for name, p in with_adapter.named_parameters():
        if "lora_b" in name:
            p.data.normal_(0, 0.1)
    ckpt = tmp_path / "tiny"
    checkpoint.save(ckpt, with_adapter, tok)
    assert checkpoint.has_adapter(open_model(ckpt)[0])
    assert not checkpoint.has_adapter(open_model(ckpt, adapter="none")[0])
    main(["export-adapter", str(tmp_path / "exported"), "--model", str(ckpt)])
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    model, _ = open_model(ckpt, adapter=tmp_path / "exported")
    got = model.encoder.layers[0].self_attn.q_proj.lora_b
    want = with_adapter.encoder.layers[0].self_attn.q_proj.lora_b
    assert got.dtype == torch.float32 and torch.equal(got, want.bfloat16().float())
    with pytest.raises(SystemExit):
        main(["export-adapter", str(tmp_path / "x"), "--model", str(ckpt), "--adapter", "none"])
    assert "no draft adapter" in capsys.readouterr().err


def test_distill_prompts_are_distinct_seeded_and_prefix_stable():
    from tridlm.train.distill import mixed_prompts

    many = mixed_prompts(3000, seed=0)
    assert len(set(many)) == 3000 and many == mixed_prompts(3000, seed=0) and many != mixed_prompts(3000, seed=1)
    assert mixed_prompts(640, seed=0) == many[:640]  # a shorter run distills a prefix of a longer one
    assert any(re.search(r"\b[a-z_]+\.[a-z_]+\b", p) for p in many[:10])  # stdlib questions name module.function
    assert any(p.startswith(("Explain", "Give", "Write", "What", "How")) and "Python" not in p for p in many[:10])


def test_magpie_prompts_are_the_models_own_finished_requests(tok, tiny_model):
    from tridlm.train.distill import heldout_requests, magpie_prompts, user_turn_prefix

    assert user_turn_prefix(tok) == tok.encode("user: ")
    assert "Explain in a few sentences why the sky is blue." in heldout_requests()
    quiet = dict(log=lambda *_: None)
    prompts = magpie_prompts(tiny_model, tok, 6, batch=8, seed=3, max_tokens=48, **quiet)
    assert len(set(prompts)) == 6 and all(p and p == p.strip() for p in prompts)
    assert prompts == magpie_prompts(tiny_model, tok, 6, batch=8, seed=3, max_tokens=48, **quiet)
    assert (
        magpie_prompts(tiny_model, tok, 6, batch=8, seed=3, max_tokens=48, exclude=(prompts[0],), **quiet)[0]
        != prompts[0]
    )
    # Each kept request is a sample the model ended itself: re-sampling its round reproduces it.
    state = generate(
        tiny_model,
        [user_turn_prefix(tok)] * 8,
        GenerationConfig(max_tokens=48, temperature=1.0, top_p=0.95, seed=3 * 1_000_003),
        detokenize=tok.decode,
    )
    finished = [state.text(j).strip() for j, r in enumerate(state.rows) if r.finish_reason == "stop"]
    assert [p for p in finished if p][:1] == prompts[:1]
    with pytest.raises(ValueError, match="complete and distinct"):
        magpie_prompts(tiny_model, tok, 4, batch=4, max_tokens=1, **quiet)  # nothing can end in one token


def test_distill_writes_the_models_own_answers(tmp_path, tok, tiny_model):
    from tridlm.train.distill import distill, stdlib_prompts

    prompts = stdlib_prompts(5, seed=1)
    assert prompts == stdlib_prompts(5, seed=1) and len(set(prompts)) == 5
    chat_tok = replace(tok, chat_template=TEMPLATE + "assistant:")
    n = distill(
        tiny_model,
        chat_tok,
        [p.lower()[:20] for p in prompts],
        tmp_path / "d.jsonl",
        batch=2,
        max_tokens=8,
        log=lambda *_: None,
    )
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert n == len(records) == 5
    first = records[0]["messages"]
    ids = chat_tok.encode_chat(first[:1])
    want = generate(tiny_model, [ids], GenerationConfig(max_tokens=8), detokenize=chat_tok.decode).text(0)
    assert first[1] == {"role": "assistant", "content": want}
