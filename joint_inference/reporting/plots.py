"""The figures of a run directory: rounds.png (unsupervised ICL) and learning_curve.png (fine-tuning).

Every line has a legend entry, and legends sit outside the axes so that they hide no data.
"""
from __future__ import annotations

from pathlib import Path

from ..core.utils import atomic_write, wilson_interval


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported when a figure is drawn, not before)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically, legends outside the axes included."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), binary=True)
    pyplot().close(fig)


def legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)


def plot_rounds(accuracies: dict[str, float] | None, title: str, path: Path, num_test: int | None = None,
                diagnostics: list[dict | None] | None = None, class_names: list[str] | None = None,
                zero_shot_shares: list[float] | None = None) -> None:
    """Test accuracy per round of unsupervised ICL (round 0 is zero-shot), beside the zero-shot and
    supervised ICL lines; with ``num_test``, the rounds' Wilson 95% intervals as a band; with the
    rounds' label-free ``diagnostics``, a second panel of the labels flipped and the vote agreement.

    ``accuracies=None`` (a run without labels): the diagnostics alone, and the share of the pool given
    each of ``class_names`` per round (round 0: ``zero_shot_shares``)."""
    if accuracies is None:
        return plot_label_free_rounds(title, path, diagnostics or [], class_names or [], zero_shot_shares)
    plt = pyplot()
    rounds = [accuracies["zero_shot"]] + [a for stage, a in accuracies.items() if stage.startswith("round_")]
    steps = range(len(rounds))
    shown = [(t, d) for t, d in enumerate(diagnostics or [], 1) if d]
    fig, axes = plt.subplots(2 if shown else 1, 1, sharex=True, figsize=(6, 6 if shown else 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [100 * a for a in rounds], "o-", color="C0", label="unsupervised ICL")
    if num_test:
        bounds = [wilson_interval(round(a * num_test), num_test) for a in rounds]
        ax.fill_between(steps, [100 * lo for lo, _ in bounds], [100 * hi for _, hi in bounds], color="C0", alpha=0.15,
                        label=f"95% interval ({num_test} test examples)")
    ax.axhline(100 * accuracies["zero_shot"], color="C7", linestyle="--", label="zero-shot")
    if "supervised_icl" in accuracies:
        ax.axhline(100 * accuracies["supervised_icl"], color="C2", linestyle=":", label="supervised ICL (true labels)")
    for i, (stage, a) in enumerate((s, a) for s, a in accuracies.items() if s.startswith("control_")):
        ax.axhline(100 * a, color=f"C{3 + i}", linestyle="-.", label=stage.replace("control_", "control: ").replace("_", " "))
    ax.set(ylabel="test accuracy (%)", title=title, xticks=list(steps))
    legend_outside(ax)
    if shown:
        diag_ax = axes[1, 0]
        diag_ax.plot([t for t, _ in shown], [100 * d["flip_fraction"] for _, d in shown], "o-", color="C3",
                     label="pool labels flipped\nsince the round before")
        diag_ax.plot([t for t, _ in shown], [100 * d["vote_agreement"] for _, d in shown], "s-", color="C4",
                     label="votes agreeing with\nthe majority")
        diag_ax.set(ylabel="share of the pool (%)", ylim=(0, 100))
        legend_outside(diag_ax)
    axes[-1, 0].set(xlabel="round (0: zero-shot labels)")
    save(fig, path)


def plot_label_free_rounds(title: str, path: Path, diagnostics: list[dict | None], class_names: list[str],
                           zero_shot_shares: list[float] | None) -> None:
    """rounds.png of a run without labels: the labels flipped and the vote agreement per round, and
    the share of the pool given each label (round 0: zero-shot)."""
    plt = pyplot()
    shown = [(t, d) for t, d in enumerate(diagnostics, 1) if d]
    fig, (diag_ax, class_ax) = plt.subplots(2, 1, sharex=True, figsize=(6, 6))
    diag_ax.plot([t for t, _ in shown], [100 * d["flip_fraction"] for _, d in shown], "o-", color="C3",
                 label="pool labels flipped\nsince the round before")
    diag_ax.plot([t for t, _ in shown], [100 * d["vote_agreement"] for _, d in shown], "s-", color="C4",
                 label="votes agreeing with\nthe majority")
    diag_ax.set(ylabel="share of the pool (%)", ylim=(0, 100), title=f"{title} (no labels: no accuracy)")
    legend_outside(diag_ax)
    steps = ([0] if zero_shot_shares else []) + [t for t, _ in shown]
    shares = ([zero_shot_shares] if zero_shot_shares else []) + [d["class_distribution"] for _, d in shown]
    for k, name in enumerate(class_names):
        class_ax.plot(steps, [100 * s[k] for s in shares], "o-", label=name)
    class_ax.set(ylabel="share given the label (%)", ylim=(0, 100), xticks=steps)
    if 0 < len(class_names) <= 12:  # more would hide the figure
        legend_outside(class_ax)
    class_ax.set(xlabel="round (0: zero-shot labels)")
    save(fig, path)


def plot_learning_curve(history: list[dict], metrics: list[dict], title: str, path: Path,
                        class_names: list[str] | None = None) -> None:
    """Fine-tuning, step by step: test accuracy at each evaluation and the batch's agreement with the
    true labels; the rewards of the sampled and the argmax labellings; the batch-average prediction's
    entropy (what the regulariser keeps up)."""
    plt = pyplot()
    fig, (acc_ax, reward_ax, entropy_ax) = plt.subplots(3, 1, sharex=True, figsize=(7, 7))
    steps = [m["step"] for m in metrics]
    if all(h.get("test_accuracy") is not None for h in history):
        acc_ax.plot([h["step"] for h in history], [100 * h["test_accuracy"] for h in history], "o-", color="C0",
                    label="test accuracy")
        acc_ax.plot(steps, [100 * m["batch_accuracy"] for m in metrics], color="C1", alpha=0.5, linewidth=0.8,
                    label="each step's batch: argmax\nlabels that are true")
        acc_ax.set(ylabel="accuracy (%)", title=title)
    else:  # no labels: the share of the examples given each label at each evaluation
        evaluated = [h for h in history if h.get("class_distribution")]
        for k, name in enumerate(class_names or range(len(evaluated[0]["class_distribution"]) if evaluated else 0)):
            acc_ax.plot([h["step"] for h in evaluated], [100 * h["class_distribution"][k] for h in evaluated], "o-",
                        label=f"predicted {name}")
        acc_ax.set(ylabel="share given\nthe label (%)", ylim=(0, 100), title=f"{title} (no labels: no accuracy)")
    reward_ax.plot(steps, [m["reward_argmax"] for m in metrics], color="C2", linewidth=0.8, label="argmax labels")
    reward_ax.plot(steps, [m["reward_sample"] for m in metrics], color="C3", linewidth=0.8, label="sampled labels")
    reward_ax.set(ylabel="reward\n(log-prob per example)")
    entropy_ax.plot(steps, [m["entropy"] for m in metrics], color="C4", linewidth=0.8,
                    label="entropy of the batch's\nmean prediction")
    entropy_ax.set(xlabel="step", ylabel="entropy (nats)")
    for ax in (acc_ax, reward_ax, entropy_ax):
        if len(ax.get_lines()) <= 12:  # more would hide the figure
            legend_outside(ax)
    save(fig, path)
