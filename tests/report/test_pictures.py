"""What the run's pictures show (issue 25): axes that read the same way, labelled ticks, spreads, the
published student, one panel per loss quantity. The tests read the matplotlib figures, not pixels."""

import matplotlib
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from compressor.report.plots import curves_figure, plot_tradeoff, tradeoff_figure


def _report(mac_ratios=(8.0, 13.0, 3.8), published="wrn-16-0.5", int8=False):
    names = ["wrn-10-1", "wrn-16-0.5", "wrn-16-1"]
    students = []
    for name, ratio, top1, speed in zip(names, mac_ratios, (97.8, 98.3, 98.6), (5.5, 4.7, 2.8)):
        s = {"name": name, "method": "at+kd", "top1": top1, "latency_speedup": speed, "latency_speedup_spread": [speed - 0.5, speed + 0.3],
             "mac_ratio": ratio, "gmacs": 0.025 / ratio, "latency_ms": 0.2 / speed}
        if int8:
            s["int8"] = {"latency_speedup_vs_teacher": speed * 1.5, "top1_int8": top1 - 0.2}
        students.append(s)
    r = {"data": {"name": "digits"}, "teacher": {"name": "wrn-16-2", "top1": 99.4, "gmacs": 0.025}, "students": students}
    if published:
        r["published"] = {"name": published, "rule": "auto", "reason": "…"}
    return r


def _drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig


def _tick_labels(ax):
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]


@pytest.mark.parametrize("ratios", [(8.0, 13.0, 3.8), (40.0, 120.0, 3.0)])
def test_tradeoff_panels_read_up_and_right_with_labelled_ticks(ratios):
    fig = _drawn(tradeoff_figure(_report(ratios)))
    speed_ax, macs_ax = fig.axes[:2]
    for ax in (speed_ax, macs_ax):
        lo, hi = ax.get_xlim()
        assert lo < hi  # x grows to the right: faster / cheaper is right
        assert not ax.xaxis_inverted() and not ax.yaxis_inverted()
        labels = _tick_labels(ax)
        assert len(labels) >= 3 and all(t.endswith("×") for t in labels), labels
    # the teacher sits at 1× and every student to its right on the multiply-add panel
    star = [c for c in macs_ax.collections if c.get_label().startswith("teacher")][0]
    assert star.get_offsets()[0][0] == 1.0
    assert macs_ax.get_xscale() == ("log" if max(ratios) / 1.0 > 20 else "linear")


def test_tradeoff_draws_the_latency_spread_as_error_bars():
    fig = tradeoff_figure(_report())
    bars = [c for c in fig.axes[0].containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(bars) == 1
    segments = bars[0].lines[2][0].get_segments()  # one horizontal bar per student: (min, y) → (max, y)
    assert [(round(s[0][0], 6), round(s[1][0], 6)) for s in segments] == [(5.0, 5.8), (4.2, 5.0), (2.3, 3.1)]


def test_tradeoff_marks_the_published_student_and_only_when_there_is_one():
    def legend_texts(fig):
        return [t.get_text() for ax in fig.axes[:2] for t in ax.get_legend().get_texts()]

    assert legend_texts(tradeoff_figure(_report())).count("published: wrn-16-0.5") == 2
    ringed = [c for c in tradeoff_figure(_report()).axes[0].collections if c.get_label() == "published: wrn-16-0.5"][0]
    assert tuple(ringed.get_offsets()[0]) == (4.7, 98.3)
    assert not any(t.startswith("published") for t in legend_texts(tradeoff_figure(_report(published=None))))


def test_tradeoff_shows_int8_copies_and_writes_a_png(tmp_path):
    fig = tradeoff_figure(_report(int8=True))
    assert any(c.get_label() == "INT8 copies" for c in fig.axes[0].collections)
    plot_tradeoff(_report(), tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def _history(terms, epochs=3, scale=1.0):
    return [{"epoch": e, **{f"train_{t}": scale * (i + 1) / e for i, t in enumerate(terms)},
             "train_loss": scale * sum(range(1, len(terms) + 1)) / e, "train_top1": 50.0 + e, "test_top1": 40.0 + 10 * e,
             "test_loss": 2.0 / e} for e in range(1, epochs + 1)]


def test_curves_give_each_loss_quantity_its_own_log_panel_and_a_final_accuracy_table():
    fig = curves_figure(("wrn-16-2", _history(["ce"])), [("wrn-10-1 (at+kd)", _history(["ce", "kd", "at"], scale=10))])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:5] == ["train: whole objective (sum of the terms)", "train term: ce", "train term: kd", "train term: at",
                          "test: cross-entropy"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes[:5])
    # the student's objective (~60) and the test cross-entropy are on different axes
    objective, test_ce = fig.axes[0], fig.axes[4]
    assert max(max(line.get_ydata()) for line in objective.get_lines()) == pytest.approx(60.0)
    assert max(max(line.get_ydata()) for line in test_ce.get_lines()) == pytest.approx(2.0)
    # the teacher has no kd/at terms: those panels hold the student alone
    assert len(fig.axes[2].get_lines()) == 1 and len(fig.axes[1].get_lines()) == 2
    table = [a for a in fig.axes if a.tables][0].tables[0]
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in table.get_celld().items()}
    assert cells[(1, 0)] == "teacher wrn-16-2" and cells[(2, 0)] == "student wrn-10-1 (at+kd)"
    assert cells[(1, 1)] == "70.00" and cells[(2, 2)] == "53.00" and cells[(2, 3)] == "3"


def test_curves_without_history_say_so():
    fig = curves_figure(None, [("x", [])])
    assert any("no training history" in t.get_text() for t in fig.axes[0].texts)
