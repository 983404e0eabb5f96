"""Pictures of attention for people: a coloured terminal heatmap (Rich) and a PNG (matplotlib).

Both take numpy arrays, never torch tensors, so the drawing code knows nothing about the model.
The terminal map goes to stderr (see `attend --help`), so the JSONL on stdout is never touched.
Long inputs are shown by binning tokens: a cell is the attention that a group of queries
(averaged) pays to a group of keys (summed), so each row still sums to 1 and nothing is hidden.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

# Viridis at five stops: perceptually even and readable for colour-blind people.
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]

_SHADES = " \u2591\u2592\u2593\u2588"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def token_labels(tokenizer, ids: Sequence[int] | None, count: int) -> list[str]:
    """One short, printable label per position: the token's text, or its index without ids."""
    if ids is None or tokenizer is None:
        return [str(i) for i in range(count)]
    labels = []
    for token_id in ids:
        try:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
        except Exception:  # a tokenizer that cannot decode a lone id still has a piece name
            text = ""
        if not text or "\ufffd" in text:
            # a byte fragment of a multi-byte character: the piece name is more telling than U+FFFD
            text = tokenizer.id_to_token(token_id) or str(token_id)
        labels.append(printable(text))
    return labels


def printable(text: str) -> str:
    """Whitespace and control characters made visible, so a label is one line and a leading space shows."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("\u2423")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def bin_attention(matrix: np.ndarray, labels: list[str], cells: int) -> tuple[np.ndarray, list[str]]:
    """Shrink a (T, T) attention map to at most `cells` x `cells`.

    Queries in a bin are averaged and keys in a bin are summed, so rows still sum to one.
    A bin's label is its first token's label with the position range, e.g. `12-15 the`.
    """
    T = matrix.shape[0]
    if T <= cells:
        return matrix, labels
    size = math.ceil(T / cells)
    starts = list(range(0, T, size))
    rows = np.stack([matrix[s : s + size].mean(axis=0) for s in starts])  # (n, T)
    binned = np.stack([rows[:, s : s + size].sum(axis=1) for s in starts], axis=1)  # (n, n)
    names = [f"{s}-{min(s + size, T) - 1} {labels[s]}" for s in starts]
    return binned, names


def _colour(value: float) -> str:
    """A value in 0..1 as a viridis hex colour."""
    value = min(max(float(value), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    low = min(int(value), len(_VIRIDIS) - 2)
    frac = value - low
    rgb = [round(a + (b - a) * frac) for a, b in zip(_VIRIDIS[low], _VIRIDIS[low + 1])]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _shade(value: float) -> str:
    """A block character for the value: the map stays readable where colours are stripped (stderr to a file)."""
    return _SHADES[min(int(min(max(float(value), 0.0), 1.0) * len(_SHADES)), len(_SHADES) - 1)]


def _fit(label: str, width: int) -> str:
    """The label in exactly `width` terminal cells (wide CJK and emoji count two), right-aligned."""
    from rich.cells import cell_len, set_cell_size

    if cell_len(label) > width:
        return set_cell_size(label, max(width - 1, 0)) + "\u2026"
    return " " * (width - cell_len(label)) + label


def _column_char(label: str, row: int) -> str:
    """Row `row` of a vertical key label, always two cells wide."""
    from rich.cells import cell_len

    ch = label[row] if row < len(label) else " "
    width = cell_len(ch)
    if width == 0:  # combining marks and joiners would glue onto the neighbouring column
        return "  "
    return ch if width >= 2 else ch + " "


def render_heatmap(console, matrix: np.ndarray, labels: list[str], title: str, header_rows: int = 6) -> None:
    """Draw one (T, T) attention map (queries down, keys across) on a Rich console.

    Each cell is two characters wide; inputs longer than the console allows are binned (see
    bin_attention). Colours are scaled to the map's largest value, which the legend states.
    """
    from rich.text import Text

    T = matrix.shape[0]
    from rich.cells import cell_len

    label_width = min(max((cell_len(x) for x in labels), default=1), 16)
    cells = max(1, min(64, (console.width - label_width - 2) // 2))
    if T > cells:  # binned rows carry their position range too: leave room for it
        cells = max(1, min(64, (console.width - 20 - 2) // 2))
    shown, names = bin_attention(np.asarray(matrix, dtype=np.float64), labels, cells)
    n = shown.shape[0]
    label_width = min(max((cell_len(x) for x in names), default=1), 16 if n == T else 20)
    peak = float(shown.max()) if shown.size else 0.0
    scale = peak if peak > 0 else 1.0

    console.print(Text(title, style="bold"))
    # key labels run down the columns, one character per line, so every key is named
    columns = [name.split(" ", 1)[-1] if n != T else name for name in names]
    for r in range(header_rows):
        line = Text(" " * (label_width + 1))
        for name in columns:
            line.append(_column_char(name, r))
        if line.plain.strip():
            console.print(line, soft_wrap=True, no_wrap=True, overflow="ignore", crop=False)
    for q in range(n):
        line = Text(_fit(names[q], label_width) + " ")
        for k in range(n):
            value = shown[q, k] / scale
            line.append(_shade(value) * 2, style=f"{_colour(value)} on {_colour(value)}")
        console.print(line, soft_wrap=True, no_wrap=True, overflow="ignore", crop=False)
    legend = Text(" " * (label_width + 1))
    for stop in (0.0, 0.25, 0.5, 0.75, 1.0):
        legend.append(_shade(stop) * 2, style=f"{_colour(stop)} on {_colour(stop)}")
    legend.append(f" 0 .. {peak:.3g}")
    console.print(legend, soft_wrap=True, no_wrap=True, overflow="ignore", crop=False)
    note = f"{T} token{'s' if T != 1 else ''}" + (f", {math.ceil(T / n)} per cell (keys summed, queries averaged)" if n != T else "")
    console.print(Text(" " * (label_width + 1) + note), soft_wrap=True, no_wrap=True, overflow="ignore", crop=False)


def png_size(count: int) -> float:
    """Figure side in inches: grows with the token count so labels stay legible, capped for huge inputs."""
    return min(4.0 + 0.22 * count, 80.0)


def write_png(path: Path, maps: list[tuple[str, np.ndarray]], labels: list[str]) -> None:
    """One heatmap per (title, (T, T) matrix), side by side in a grid, with token labels on both axes."""
    import matplotlib

    matplotlib.use("Agg")  # never a window, works without a display
    import matplotlib.pyplot as plt

    T = len(labels)
    side = png_size(T)
    ncols = min(len(maps), 4)
    nrows = math.ceil(len(maps) / ncols)
    # one figure per request; keep the whole picture under matplotlib's pixel limit
    dpi = min(100, int(60000 / (side * max(ncols, nrows))))
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows), squeeze=False, dpi=dpi)
    step = max(1, math.ceil(T / 400))  # past 400 tokens not every label fits even on a large figure
    ticks = list(range(0, T, step))
    fontsize = 8
    try:
        for ax, (title, matrix) in zip(axes.flat, maps):
            image = ax.imshow(matrix, cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_title(title)
            ax.set_xticks(ticks)
            ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=fontsize)
            ax.set_yticks(ticks)
            ax.set_yticklabels([labels[i] for i in ticks], fontsize=fontsize)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for ax in list(axes.flat)[len(maps) :]:
            ax.axis("off")
        with warnings.catch_warnings():
            # token labels in scripts the default font lacks (CJK, emoji) draw as boxes; that is no error
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.tight_layout()
            fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)


class PerRecordPath:
    """FILE for a single record; FILE with the record id inserted (`attn-3.png`) once there are several.

    Records stream, so whether there will be a second one is not known when the first is written:
    the first is written to FILE and renamed when the second arrives.
    """

    def __init__(self, path: str | Path):
        self.base = Path(path)
        self.first: tuple[Path, object] | None = None
        self.count = 0

    def with_id(self, record_id: object) -> Path:
        name = _ID_UNSAFE.sub("_", str(record_id)) or "record"
        return self.base.with_name(f"{self.base.stem}-{name}{self.base.suffix}")

    def next(self, record_id: object) -> Path:
        self.count += 1
        if self.count == 1:
            self.first = (self.base, record_id)
            return self.base
        if self.count == 2 and self.first is not None:
            first_path, first_id = self.first
            if first_path.exists():
                first_path.replace(self.with_id(first_id))
        return self.with_id(record_id)
