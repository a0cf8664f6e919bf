"""The detector on synthetic loss / grad-norm sequences."""

import math
import random

import pytest

from lightning_te_moe.guard.detector import DivergenceDetector
from lightning_te_moe.guard.config import GuardConfig


def healthy_run(steps: int, seed: int) -> list[tuple[float, float]]:
    """A noisy, decaying loss (10% multiplicative noise) and a heavy-tailed grad norm (occasional 3x spikes)."""
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        loss = (2.0 + 8.0 * math.exp(-t / 150)) * (1 + 0.1 * rng.gauss(0, 1))
        grad = 1.0 * math.exp(rng.gauss(0, 0.3)) * (3.0 if rng.random() < 0.02 else 1.0)
        out.append((loss, grad))
    return out


def run(detector: DivergenceDetector, series: list[tuple[float, float]]) -> list:
    return [t for step, (loss, grad) in enumerate(series) if (t := detector.update(step, loss, grad))]


@pytest.mark.parametrize("seed", range(10))
def test_healthy_noisy_runs_never_trigger(seed: int) -> None:
    assert run(DivergenceDetector(GuardConfig()), healthy_run(3000, seed)) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_triggers_at_once_even_in_warmup(bad: float) -> None:
    detector = DivergenceDetector(GuardConfig())
    assert detector.update(0, 3.0, 1.0) is None
    trigger = detector.update(1, bad, 1.0)
    assert trigger is not None and trigger.nonfinite and trigger.rule == "nonfinite_loss" and trigger.step == 1


def test_nonfinite_grad_norm_triggers() -> None:
    trigger = DivergenceDetector(GuardConfig()).update(0, 3.0, math.nan)
    assert trigger is not None and trigger.rule == "nonfinite_grad_norm"


def test_single_spike_within_patience_does_not_trigger() -> None:
    series = healthy_run(400, 1)
    for i in (250, 300, 301, 302):  # one spike, then a run of 3 < patience 4
        series[i] = (series[i][0] * 20, series[i][1] * 50)
    assert run(DivergenceDetector(GuardConfig()), series) == []


def test_sustained_spike_triggers_after_patience() -> None:
    series = healthy_run(400, 2)
    for i in range(300, 320):
        series[i] = (series[i][0] * 5, series[i][1])
    triggers = run(DivergenceDetector(GuardConfig()), series)
    assert triggers and triggers[0].rule == "loss_spike" and triggers[0].step == 303 and triggers[0].streak == 4
    assert triggers[0].value > triggers[0].threshold > triggers[0].median


def test_sustained_grad_norm_spike_triggers_and_can_be_ignored() -> None:
    series = healthy_run(400, 3)
    for i in range(300, 320):
        series[i] = (series[i][0], series[i][1] * 100)
    assert run(DivergenceDetector(GuardConfig()), series)[0].rule == "grad_norm_spike"
    assert run(DivergenceDetector(GuardConfig(watch_grad_norm=False)), series) == []


def test_slow_blow_up_triggers_before_overflow() -> None:
    series = healthy_run(300, 4)
    loss = series[-1][0]
    for _ in range(200):  # 3% growth per step
        loss *= 1.03
        series.append((loss, 1.0))
    triggers = run(DivergenceDetector(GuardConfig()), series)
    assert triggers and triggers[0].rule == "loss_spike" and 300 < triggers[0].step < 350  # about 2x the healthy level


def test_warmup_hides_spikes_but_not_nonfinite() -> None:
    detector = DivergenceDetector(GuardConfig(warmup=50))
    assert [detector.update(i, 100.0 if i > 5 else 1.0, 1.0) for i in range(50)] == [None] * 50


def test_state_dict_round_trip_keeps_the_window_and_streak() -> None:
    detector = DivergenceDetector(GuardConfig())
    series = healthy_run(200, 5)
    run(detector, series)
    detector.update(200, 1e3, 1.0)
    copy = DivergenceDetector(GuardConfig())
    copy.load_state_dict(detector.state_dict())
    assert copy.state_dict() == detector.state_dict() and copy.in_streak


@pytest.mark.parametrize(("field", "value", "message"), [
    ("patience", 0, "GuardConfig.patience must be >= 1, got 0"),
    ("snapshot_every", 0, "GuardConfig.snapshot_every must be >= 1 or None, got 0"),
    ("snapshot_budget", 0.0, r"GuardConfig.snapshot_budget is a share of step time in \(0, 1\), got 0.0"),
    ("repeat_window", -1, "GuardConfig.repeat_window must be >= 0, got -1"),
])
def test_config_is_validated(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuardConfig(**{field: value})


def test_an_open_streak_can_be_judged_before_patience() -> None:
    """Before a checkpoint the guard asks whether a series is above its threshold, for fewer than patience steps."""
    detector = DivergenceDetector(GuardConfig())
    run(detector, healthy_run(200, 7))
    assert detector.open_streak() is None
    assert detector.update(200, 1e3, 1.0) is None and detector.update(201, 2e3, 1.0) is None
    trigger = detector.open_streak()
    assert (trigger.rule, trigger.step, trigger.value, trigger.streak) == ("loss_spike", 201, 2e3, 2)
    assert trigger.value > trigger.threshold


def test_rollback_forgets_later_values_and_warms_up_when_too_few_remain() -> None:
    detector = DivergenceDetector(GuardConfig(warmup=50))
    run(detector, healthy_run(120, 6))
    detector.rollback_to(100)
    loss = detector.series["loss"]
    assert [s for s, _ in loss.window][-1] == 100 and loss.seen == 101 and not detector.in_streak
    detector.rollback_to(-1)
    assert not loss.window and loss.seen == 0
    assert detector.update(0, 100.0, 1.0) is None  # warming up again: no spike rule yet
