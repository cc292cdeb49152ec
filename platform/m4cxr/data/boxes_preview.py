"""The corpus's boxes preview: one tile per dataset that has boxes (its sample with the most
boxes), drawn on the stored image with the boxes in yellow and their labels: a quick look that
each dataset's boxes land where they should (data prepare writes boxes_preview.png)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from m4cxr.data.schema import ImageStore, samples_path  # noqa: E402


class BoxTiles:
    """The boxes preview's choice: per dataset, its sample with the most boxes, the first seen
    on ties. Offered a samples table at a time (a corpus's files in name order, or prepare's
    tables as it writes them)."""

    def __init__(self):
        self.best: dict[str, tuple[int, dict]] = {}  # dataset -> (box count, row)

    def offer(self, table: pa.Table) -> None:
        counts = pc.list_value_length(table.column("boxes")).fill_null(0).to_numpy(zero_copy_only=False)
        datasets = table.column("dataset").to_pylist()
        for n in np.flatnonzero(counts):
            if counts[n] > self.best.get(datasets[n], (0, None))[0]:
                self.best[datasets[n]] = (int(counts[n]), table.slice(int(n), 1).to_pylist()[0])

    def merge(self, other: "BoxTiles") -> None:
        """`other`'s choice as if its tables had been offered after this one's."""
        for dataset, (count, row) in other.best.items():
            if count > self.best.get(dataset, (0, None))[0]:
                self.best[dataset] = (count, row)


def boxes_preview(corpus_dir: str | Path, path: str | Path) -> list[str]:
    """A grid of stored images with their sample boxes (yellow) and labels, one tile per dataset
    that has boxes (its sample with the most boxes): a quick look that each dataset's boxes land
    where they should. Returns the datasets drawn."""
    tiles = BoxTiles()
    for file in sorted(samples_path(corpus_dir).glob("*.parquet")):
        tiles.offer(pq.read_table(file, columns=["dataset", "task", "images", "boxes"]))
    return draw_box_tiles(tiles, ImageStore(corpus_dir).load, path)


def draw_box_tiles(tiles: BoxTiles, load_image, path: str | Path) -> list[str]:
    """boxes_preview's grid for a choice of samples; `load_image(image_id)` opens a stored image."""
    if not tiles.best:
        return []
    cols = min(4, len(tiles.best))
    rows_n = (len(tiles.best) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 3.3 * rows_n), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (dataset, (_, row)) in zip(axes.ravel(), sorted(tiles.best.items())):
        image_id = row["images"][row["boxes"][0]["image_index"]]["image_id"]
        with load_image(image_id) as im:
            ax.imshow(im.convert("L"), cmap="gray")
        for b in row["boxes"]:
            x1, y1, x2, y2 = b["box"]
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=1.5))
            ax.text(x1, y1, textwrap.shorten(b["label"], 24), color="yellow", fontsize=6, va="bottom")
        ax.set_title(f"{dataset}\n{row['task']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return sorted(tiles.best)
