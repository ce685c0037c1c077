"""Pictures: attention heatmaps of translations and learning curves of runs (PNG).

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no display, no global
backend switch, so plotting works headless and from any thread. Every PNG is written
to a temporary file and renamed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from nmt.checkpoint import atomic_write

EOS_PIECE = "</s>"
_CELL_INCHES = 0.22  # one source or target piece: room for an 8-point label


def _save(fig: Figure, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# ---------------------------------------------------------------------------- attention


def plot_attention(path: Path, weights, src_pieces: list[str], trg_pieces: list[str], title: str = "") -> None:
    """One heatmap: target pieces down, source pieces across, a_ij as shades of grey.

    :param weights: ``[len(trg_pieces), len(src_pieces)]`` attention weights, each row
        over the source (array-like, values in [0, 1])
    :param src_pieces: source pieces, eos included
    :param trg_pieces: emitted target pieces, eos included
    """
    n_trg, n_src = len(trg_pieces), len(src_pieces)
    if tuple(getattr(weights, "shape", ())) != (n_trg, n_src):
        raise ValueError(f"attention of shape {tuple(weights.shape)} for {n_trg} target x {n_src} source pieces")
    # The figure grows with the sentence, so that a 40-piece sentence keeps legible labels.
    fig = Figure(figsize=(max(4.0, 2.2 + _CELL_INCHES * n_src), max(3.0, 1.8 + _CELL_INCHES * n_trg)))
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_src), src_pieces, rotation=90, fontsize=8)
    ax.set_yticks(range(n_trg), trg_pieces, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    if title:
        ax.set_title(title, fontsize=9, pad=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    _save(fig, path)


class AttentionPlots:
    """A hook for :meth:`nmt.translate.Translator.translate`: one PNG per translated line,
    ``DIR/000001.png`` for line 1, showing the best hypothesis. Empty lines have none.

    :param first: plot only lines 1 .. first (None: all)
    """

    def __init__(self, folder: Path, src_tok, trg_tok, first: int | None = None):
        self.folder = Path(folder)
        self.src_tok = src_tok
        self.trg_tok = trg_tok
        self.first = first
        self.written: list[Path] = []

    def __call__(self, line_no: int, src_ids: list[int], nbest: list) -> None:
        if (self.first is not None and line_no > self.first) or not src_ids:
            return
        text, hyp = nbest[0]
        path = self.folder / f"{line_no:06d}.png"
        plot_attention(
            path,
            hyp.attention.float().cpu().numpy(),
            self.src_tok.pieces(src_ids) + [EOS_PIECE],
            self.trg_tok.pieces(hyp.tokens) + [EOS_PIECE],
            title=f"line {line_no}: {_shorten(text)}  (score {hyp.score:.2f})",
        )
        self.written.append(path)


def _shorten(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------- learning curves

# (panel title, record kind, field): what `nmt.train` writes to metrics.jsonl
PANELS = [
    ("training loss (per target token, label-smoothed)", "train", "loss"),
    ("validation loss (per target token)", "valid", "valid_loss"),
    ("validation BLEU", "valid", "valid_bleu"),
    ("learning rate", "train", "lr"),
]


def plot_learning_curves(runs: list[tuple[str, dict[str, list[dict]]]], path: Path) -> None:
    """Four panels against updates: training loss, validation loss, validation BLEU and
    learning rate, one line per run (a colour each, named in the legend).

    :param runs: ``(label, nmt.runs.read_metrics(...))`` per run
    """
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2).flatten()
    for k, (label, metrics) in enumerate(runs):
        colour = f"C{k % 10}"
        for ax, (_, kind, field) in zip(axes, PANELS):
            points = [(r["step"], r[field]) for r in metrics[kind] if isinstance(r.get(field), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=colour, label=label, marker="o" if kind == "valid" else None,
                        markersize=3, linewidth=1.2)
    for ax, (title, _, _) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(True, alpha=0.3)
    axes[3].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    legend: dict = {}  # label -> line, over all panels (a run may lack a kind of record)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=min(len(runs), 4),
               fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path)
