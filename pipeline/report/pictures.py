"""The report's pictures: per trained model, samples and test images beside their reconstructions
(:mod:`iwae.pictures`), read from each run's final checkpoint in the results location."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iwae.checkpoint import CheckpointError
from iwae.evaluate import EvalConfig, binarize_by_id
from iwae.pictures import grid, reconstruction_means, sample_means
from iwae.state import model_from_checkpoint
from pipeline.report.summary import Loaded
from pipeline.report.tables import run_labels
from pipeline.store.ledger import load_final
from pipeline.store.results import Results

RECONSTRUCTED = 16  # test images shown with their reconstructions, the first ones (binarised as the evaluation does)
PICTURES = 8  # per-run pictures by default: the runs Table 1 shows first (each reads a final checkpoint)


def chosen(loaded: Loaded, limit: int) -> list[str]:
    """The done runs to draw, at most ``limit``: Table 1's VAE and IWAE of each row first, then the
    others in the summary's order."""
    from pipeline.report.tables import table1_cells

    done = [str(r) for r in loaded.summary[loaded.summary.status == "done"].run_id]
    first = [str(r.run_id) for c in table1_cells(loaded) for r in (c.vae, c.iwae) if r is not None]
    return list(dict.fromkeys([*[r for r in first if r in done], *done]))[: max(0, limit)]


def picture_name(run_id: str, label: str, with_test: bool) -> str:
    """A picture's file name: the run (whose final checkpoint never changes) and what else is drawn
    (its label, whether test images are shown), so that a picture already in the report is current."""
    import hashlib

    return f"pictures-{run_id}-{hashlib.sha256(f'{label}|{with_test}|{RECONSTRUCTED}'.encode()).hexdigest()[:8]}.png"


def pictures(
    results: Results, loaded: Loaded, out_dir: Path, data: Any = None, limit: int = PICTURES, have: frozenset[str] = frozenset()
) -> list[tuple[str, Path]]:
    """One PNG per drawn run (:func:`chosen`, ``limit`` of them): 64 samples, and the first test
    images over their reconstructions (when ``data``, a :class:`~pipeline.datasource.DataSource`, has
    the run's dataset here). ``have``: the names already in the report's folder, drawn by an earlier
    report and not drawn again (a re-run reads no checkpoint). Returns ``(run label, path)`` pairs; a
    path that was not drawn now does not exist under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = run_labels(loaded.summary)
    out: list[tuple[str, Path]] = []
    rows = loaded.summary.set_index(loaded.summary.run_id.astype(str), drop=False)
    for rid in chosen(loaded, limit):
        r = next(rows.loc[[rid]].itertuples())
        name = picture_name(rid, labels[rid], _test_images(data, getattr(r, "dataset", None), getattr(r, "split", None)) is not None)
        if name in have:
            out.append((labels[rid], out_dir / name))
            continue
        try:
            model, cfg = model_from_checkpoint(load_final(results, str(r.run_id)), f"run {r.run_id}'s final checkpoint", "cpu")
        except (CheckpointError, OSError):
            continue  # the runs table says done, its checkpoint is not there (yet): no picture, the tables still stand
        fortran = cfg.dataset == "omniglot"  # chardata.mat's pixels are column-major
        panels = [("samples from p(x)", grid(sample_means(model, 64), 8, fortran))]
        test = _test_images(data, cfg.dataset, cfg.split)
        if test is not None:
            ids = list(range(len(test)))
            x = binarize_by_id(torch.as_tensor(test), ids, EvalConfig().seed)
            both = torch.cat([x.reshape(2, -1, x.shape[1]), reconstruction_means(model, x).reshape(2, -1, x.shape[1])], 1).reshape(-1, x.shape[1])
            panels.append(("test images (rows 1, 3) and reconstructions (rows 2, 4)", grid(both, RECONSTRUCTED // 2, fortran)))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
        for ax, (title, img) in zip(list(getattr(axes, "flat", [axes])), panels):
            ax.imshow(img.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(labels[rid], fontsize=9)
        path = out_dir / picture_name(rid, labels[rid], test is not None)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        out.append((labels[rid], path))
    return out


def _test_images(data: Any, dataset: str | None, split: str | None) -> Any:
    """The run's first test images (grey levels), or None when its dataset is not here."""
    if data is None or dataset is None:
        return None
    try:
        return data.load(dataset, split).test[:RECONSTRUCTED]
    except Exception:  # noqa: BLE001  # a missing or foreign data file: the pictures go without reconstructions
        return None
