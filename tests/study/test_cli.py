"""The scripts' command lines: --fused is --backend auto (the explicit --backend wins), every flag's help names its
default at most once, and the warm-up schedule the flag describes."""

import pytest
import torch

import train_dpo
import train_sentiment
from lora_fast.study.cli import dataclass_parser
from lora_fast.study.training import make_scheduler


@pytest.mark.parametrize(
    ("argv", "backend"),
    [
        ([], "torch"),
        (["--fused"], "auto"),
        (["--no-fused"], "torch"),
        (["--fused", "--backend", "reference"], "reference"),
        (["--backend", "triton", "--fused"], "triton"),
        (["--backend", "reference"], "reference"),
    ],
)
def test_fused_is_backend_auto_and_backend_wins(argv, backend):
    cfg = train_sentiment.parse_config(argv)
    assert cfg.backend == backend and not hasattr(cfg, "fused")


@pytest.mark.parametrize("script", [train_sentiment, train_dpo], ids=["train_sentiment", "train_dpo"])
def test_help_names_each_default_once(script):
    cls = script.Config if script is train_sentiment else script.DPOConfig
    parser = dataclass_parser(cls, script.__doc__)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.help}
    assert "--model" in helps and "--out" in helps
    for flag, text in helps.items():
        assert text.count("(default") <= 1, (flag, text)


def test_warmup_is_linear_from_zero_then_constant():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, lrs = make_scheduler(optimizer, 4), []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0).get_last_lr() == [1.0]
