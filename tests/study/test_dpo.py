"""DPO: the loss against hand values, its gradient's direction, the disable_lora reference against a held copy,
completion-only log-probs, the scorer's batching, and a short end-to-end train_dpo.py run on a tiny random GPT-2."""

import copy
import json
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_fast import apply_lora, disable_lora, load_adapter, lora_modules, save_adapter
from lora_fast.study.dpo import (
    completion_logprobs,
    dpo_loss,
    dpo_step,
    make_pairs,
    pack,
    reference_logprobs,
    sample_continuations,
    sentiment_scores,
    sequence_logprobs,
    token_kl_sum,
)
from lora_fast.study.errors import NonFiniteError
from lora_fast.study.precision import choose_precision
from lora_fast.study.prompts import label_token_ids
from tests.helpers import tiny_gpt2_config

EOS = 50256


def tiny_policy(seed=0, b_std=0.3):
    """A tiny GPT-2 with LoRA on c_attn (lora_B ~ N(0, b_std²), so policy and reference differ) and a frozen copy of
    the model taken before LoRA went in."""
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    frozen = copy.deepcopy(base)
    apply_lora(base, ["attn.c_attn"], r=4, alpha=8)
    for _, layer in lora_modules(base):
        torch.nn.init.normal_(layer.lora_B, std=b_std)
    return base, frozen


def some_pairs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(0, EOS, (k,), generator=g).tolist()
    return [(rand(2 + i), rand(3 + i % 2), rand(4 - i % 2)) for i in range(n)]


# --- the loss ------------------------------------------------------------------------------------------------------


def test_dpo_loss_hand_values_fp64():
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)
    pi_w, pi_l = f64(-3.0, -10.0), f64(-5.0, -9.0)
    ref_w, ref_l = f64(-3.5, -8.0), f64(-4.0, -9.5)
    beta = 0.5
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
    # Pair 1: logratios 0.5 and -1.0, z = 0.5·1.5 = 0.75. Pair 2: -2.0 and 0.5, z = 0.5·(-2.5) = -1.25.
    want = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(1.25))) / 2
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(out.chosen_rewards, f64(0.25, -1.0))
    torch.testing.assert_close(out.rejected_rewards, f64(-0.5, 0.25))
    m = out.metrics()
    assert m["reward_margin"] == pytest.approx((0.75 - 1.25) / 2)
    assert m["reward_accuracy"] == 0.5


def test_dpo_gradient_raises_chosen_lowers_rejected():
    logps = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    pi_w, pi_l, ref_w, ref_l = logps
    dpo_loss(pi_w, pi_l, ref_w.detach(), ref_l.detach(), beta=0.3).loss.backward()
    # Gradient descent moves along -grad: the chosen log-probs go up, the rejected ones down.
    assert (logps.grad[0] < 0).all() and (logps.grad[1] > 0).all()
    # d loss / d logπ(y_w) = -β σ(-z) / B exactly.
    z = 0.3 * ((pi_w - ref_w) - (pi_l - ref_l)).detach()
    torch.testing.assert_close(logps.grad[0], -0.3 * torch.sigmoid(-z) / 5)


def test_dpo_steps_raise_the_margin():
    model, _ = tiny_policy(b_std=0.0)  # a fresh adapter: the policy starts as the reference
    pairs = some_pairs(4)
    ref_w, ref_l = reference_logprobs(model, pairs, EOS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first = dpo_step(model, opt, pairs, ref_w, ref_l, 0.5, EOS).metrics()
    for _ in range(4):
        last = dpo_step(model, opt, pairs, ref_w, ref_l, 0.5, EOS).metrics()
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert last["reward_margin"] > first["reward_margin"] + 1e-3 and last["loss"] < first["loss"]


# --- reference policy and log-probs --------------------------------------------------------------------------------


def test_disable_lora_reference_equals_a_frozen_copy():
    model, frozen = tiny_policy()
    pairs = some_pairs(3)
    batch = pack([p for p, _, _ in pairs], [c for _, c, _ in pairs], EOS)
    with torch.no_grad():
        held = sequence_logprobs(frozen, batch)
        with disable_lora(model):
            ref = sequence_logprobs(model, batch)
        policy = sequence_logprobs(model, batch)
    torch.testing.assert_close(ref, held, rtol=0, atol=1e-6)
    assert (policy - held).abs().max() > 1e-3  # the LoRA really changes the policy, so the check above means something
    ref_w, ref_l = reference_logprobs(model, pairs, EOS, batch_size=2)
    rejected = pack([p for p, _, _ in pairs], [r for _, _, r in pairs], EOS)
    with torch.no_grad():
        torch.testing.assert_close(ref_w, held, rtol=0, atol=1e-5)
        torch.testing.assert_close(ref_l, sequence_logprobs(frozen, rejected), rtol=0, atol=1e-5)


def test_completion_logprobs_mask_prompt_and_padding():
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    batch = pack(prompts, completions, pad_id=0)
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    ids, mask = batch["input_ids"], batch["completion_mask"]
    logits = torch.randn(2, 5, 20, dtype=torch.float64)
    got = completion_logprobs(logits, ids, mask)
    logp = logits.log_softmax(-1)
    want = [logp[0, 2, 9] + logp[0, 3, 10], logp[1, 0, 11] + logp[1, 1, 12] + logp[1, 2, 13]]
    torch.testing.assert_close(got, torch.stack(want))  # fp64 logits: summed in fp64
    # Logits that predict prompt tokens (row 0, positions 0-1), the last position, or padding don't count ...
    for b, t in [(0, 0), (0, 1), (0, 4), (1, 3), (1, 4)]:
        bumped = logits.clone()
        bumped[b, t] += torch.randn(20, dtype=torch.float64) * 5
        torch.testing.assert_close(completion_logprobs(bumped, ids, mask), got)
    # ... and a logit that predicts a completion token does.
    bumped = logits.clone()
    bumped[1, 1, 12] += 1.0
    assert completion_logprobs(bumped, ids, mask)[1] > got[1] + 0.01


def test_token_kl_sum_matches_torch_distributions():
    p, q = torch.randn(2, 4, 7, dtype=torch.float64), torch.randn(2, 4, 7, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
    )
    torch.testing.assert_close(token_kl_sum(p, q, mask), (kl * mask).sum(-1).float())
    assert token_kl_sum(p, p, mask).abs().max() < 1e-6


def test_make_pairs_best_vs_worst_and_ties():
    prompts = [[1], [2], [3]]
    samples = [[[10], [11], [12]], [[20], [21]], [[30], [31]]]
    scores = [[0.2, 0.9, 0.1], [0.5, 0.5], [0.7, 0.3]]
    assert make_pairs(prompts, samples, scores) == [([1], [11], [12]), ([3], [30], [31])]


# --- sampling and scoring ------------------------------------------------------------------------------------------


def test_sentiment_scores_batched_equals_one_by_one(tokenizer):
    model, _ = tiny_policy(1)
    texts = ["a gorgeous , witty film", "dull", "the plot is thin and the jokes fall flat , sadly"]
    build = lambda t: f"Text: {t}\nLabel:"
    labels = label_token_ids(tokenizer)
    batched = sentiment_scores(model, tokenizer, texts, build, labels, batch_size=3)
    with torch.no_grad():
        for i, t in enumerate(texts):
            ids = torch.tensor([tokenizer.encode(build(t))])
            logits = model(ids).logits[0, -1, list(labels)].float()
            assert batched[i].item() == pytest.approx(torch.softmax(logits, -1)[1].item(), abs=1e-5)


def test_sample_continuations_shapes_and_eos_cut():
    model, _ = tiny_policy(2)
    with torch.no_grad():  # a constant final hidden state v, and EOS's logit log(50256 / 8): P(EOS) ≈ 1/9 a step
        v = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.lm_head.weight[EOS] = v / v.dot(v) * math.log(50256 / 8)
    torch.manual_seed(0)
    prompts = [[464, 2068], [464, 2068, 7586], [15496]]
    out = sample_continuations(model, prompts, k=3, max_new_tokens=5, eos_id=EOS)
    assert [len(ys) for ys in out] == [3, 3, 3]
    for ys in out:
        for y in ys:
            assert 1 <= len(y) <= 5
            assert EOS not in y[:-1]  # cut right after the first EOS
    lengths = [len(y) for ys in out for y in ys]
    assert min(lengths) < 5 and max(lengths) == 5 and all(y[-1] == EOS for ys in out for y in ys if len(y) < 5)
    torch.manual_seed(0)
    assert sample_continuations(model, prompts, k=3, max_new_tokens=5, eos_id=EOS) == out


# --- the script ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer_dir):
    from transformers import GPT2TokenizerFast

    root = tmp_path_factory.mktemp("dpo")
    tok = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(n_positions=256, vocab_size=len(tok)))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    scorer = apply_lora(GPT2LMHeadModel.from_pretrained(root / "tiny"), ["attn.c_attn"], r=4, alpha=8)
    for _, layer in lora_modules(scorer):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    save_adapter(scorer, root / "scorer")
    return root


@pytest.mark.slow
def test_train_dpo_end_to_end(tiny_dirs, data_dir, tmp_path, monkeypatch):
    import train_dpo

    out = tmp_path / "run"
    argv = ["--model", str(tiny_dirs / "tiny"), "--scorer", str(tiny_dirs / "scorer"), "--data-dir", str(data_dir),
            "--num-prompts", "6", "--samples-per-prompt", "3", "--num-eval-prompts", "4", "--eval-samples", "2",
            "--max-new-tokens", "5", "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--betas", "0.1", "1.0",
            "--beta", "0.1", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]  # fmt: skip
    assert train_dpo.main(argv) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "adapter", "adapters"}
    assert (out / "reward_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["betas"] == [0.1, 1.0]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["beta"] for r in summary["runs"]] == [0.1, 1.0]
    assert summary["before"]["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the reference
    for run in summary["runs"]:
        assert run["after"]["kl"] > 0 and 0 <= run["after"]["reward"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 6 and all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert sum(r["event"] == "eval" for r in records) == 3
    policy = load_adapter(GPT2LMHeadModel.from_pretrained(tiny_dirs / "tiny"), out / "adapter")
    assert any(True for _ in lora_modules(policy))
    # No --targets: GPT-2's query/key/value projection, the model type's default for DPO.
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["attn.c_attn"]


def test_train_dpo_clear_errors(tiny_dirs, data_dir, tmp_path, capsys):
    import train_dpo

    base = ["--model", str(tiny_dirs / "tiny"), "--data-dir", str(data_dir), "--out", str(tmp_path / "o")]
    scorer, tiny, data = ["--scorer", str(tiny_dirs / "scorer")], str(tiny_dirs / "tiny"), str(data_dir)
    for argv, message, code in [
        (base, "--scorer DIR is required", 2),
        ([*base, "--scorer", str(tmp_path / "nowhere")], "no adapter_config.json", 2),
        ([*scorer, "--model", tiny, "--data-dir", data, "--targets", "attn.q_proj"], "--targets attn.q_proj: ", 2),
        ([*scorer, "--model", tiny, "--data-dir", str(tmp_path / "nodata")], "no such folder", 1),
        ([*scorer, "--model", str(tmp_path / "nomodel"), "--data-dir", data], "--model", 1),
        ([*scorer, "--model", tiny, "--scorer-model", str(tmp_path / "x"), "--data-dir", data], "--scorer-model", 1),
        ([*scorer, "--model", tiny, "--data-dir", data, "--device", "cuda:7"], "--device cuda:7", 2),
    ]:
        assert train_dpo.main([*argv, "--out", str(tmp_path / "o")]) == code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]  # after transformers' progress bars
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()  # the run folder comes after the models have loaded


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples-per-prompt", "1"], "--samples-per-prompt 1: must be at least 2"),
        (["--num-prompts", "0"], "--num-prompts 0: must be at least 1"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--batch-size", "-1"], "--batch-size -1: must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["--r", "0"], "--r 0: must be at least 1"),
        (["--prompt-tokens", "0", "8"], "--prompt-tokens 0 8: each must be at least 1"),
        (["--prompt-tokens", "6", "2"], "--prompt-tokens 6 2: MIN must be at most MAX"),
        (["--lr", "0"], "--lr 0.0: must be a finite number in (0, inf)"),
        (["--lr", "inf"], "--lr inf: must be a finite number in (0, inf)"),
        (["--alpha", "nan"], "--alpha nan: must be a finite number"),
        (["--beta", "0"], "--beta 0.0: must be a finite number in (0, inf)"),
        (["--betas", "0.1", "-1"], "--betas 0.1 -1.0: each must be a finite number in (0, inf)"),
        (["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_flags_are_refused_by_name_before_loading(tiny_dirs, tmp_path, capsys, flags, message):
    import train_dpo

    # A --model that would fail to load and a --data-dir that does not exist: the flag is refused before either.
    argv = ["--model", tmp_path / "no-model", "--scorer", tiny_dirs / "scorer", "--data-dir", tmp_path / "no-data"]
    code = train_dpo.main([*map(str, argv), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"error: {message}"], err
    assert not (tmp_path / "o").exists()


def test_an_out_holding_a_run_is_refused_unless_overwrite(tiny_dirs, tmp_path, capsys):
    import train_dpo

    out = tmp_path / "run"
    (out / "adapters" / "beta_0.1").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["--model", str(tmp_path / "no-model"), "--scorer", str(tiny_dirs / "scorer"), "--out", str(out)]
    assert train_dpo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out} holds a run already (summary.json, adapters): pass --overwrite to start it " \
        "afresh, or another --out", err  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "file").write_text("x")
    assert train_dpo.main([*argv[:-1], str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'}: {tmp_path / 'file'} is a file; give a folder" in capsys.readouterr().err
    # --overwrite passes the check; the old run's files go once the models have loaded, other files stay.
    cfg = train_dpo.parse_args([*argv, "--overwrite", "--data-dir", str(tmp_path)])  # local data: no hub check
    assert train_dpo.check_config(cfg) is None
    (out / ".adapter.a1b2c3d4.old" / "adapter").mkdir(parents=True)  # the old run's adapter/, left aside by a kill
    train_dpo.open_run_folder(cfg, out, choose_precision("fp32", torch.device("cpu")))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert json.loads((out / "config.json").read_text())["overwrite"] is True


def test_script_help_lists_every_flag(capsys):
    import train_dpo

    with pytest.raises(SystemExit):
        train_dpo.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ["--model", "--scorer", "--scorer-model", "--data-dir", "--num-prompts", "--samples-per-prompt",
                 "--max-new-tokens", "--steps", "--batch-size", "--lr", "--r", "--alpha", "--beta", "--betas",
                 "--seed", "--device", "--out", "--overwrite"]:  # fmt: skip
        assert flag in text


def test_a_non_finite_dpo_gradient_is_not_applied():
    model, _ = tiny_policy()
    pairs = some_pairs(2)
    ref_w, ref_l = reference_logprobs(model, pairs, EOS)
    params = [p for p in model.parameters() if p.requires_grad]
    params[0].register_hook(lambda g: g * float("nan"))  # a finite loss, a NaN gradient
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    with pytest.raises(NonFiniteError, match=r"^the gradient norm is nan \(the DPO loss is finite\)"):
        dpo_step(model, opt, pairs, ref_w, ref_l, 0.5, EOS)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
