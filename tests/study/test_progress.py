"""Progress of long phases where the output is no terminal (a log file, a pipe): lines with the time left."""

from lora_fast.study.progress import phase, progress


def test_lines_give_done_total_rate_and_time_left(monkeypatch, capsys):
    monkeypatch.setenv("LORA_FAST_PROGRESS_EVERY", "0")
    assert list(progress(range(4), desc="scoring", unit="batch")) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("scoring: 0/4 batches (0%), 0:00 elapsed")
    assert lines[-1].startswith("scoring: 4/4 batches (100%)") and "batch/s" in lines[-1] and "left" in lines[-1]
    assert len(lines) == 5


def test_lines_come_at_most_every_interval(monkeypatch, capsys):
    monkeypatch.setenv("LORA_FAST_PROGRESS_EVERY", "3600")
    with progress(desc="training", total=50, unit="step", initial=10) as bar:
        for _ in range(40):
            bar.update(1)
            bar.set_postfix(loss="0.5")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["training: 10/50 steps (20%)", "training: 50/50 steps (100%)"]
    assert lines[-1].endswith("loss=0.5")


def test_only_the_main_process_reports_and_phases_say_their_time(capsys):
    assert list(progress(range(2), desc="x", main=False)) == [0, 1]
    with phase("loading the model"):
        pass
    with phase("quiet", main=False):
        pass
    assert capsys.readouterr().err.splitlines() == ["loading the model ...", "loading the model: done in 0.0 s"]
