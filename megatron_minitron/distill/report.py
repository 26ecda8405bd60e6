"""Training metrics: JSONL (always), TensorBoard (when installed), a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_minitron.checkpoint.atomic import write_text

METRICS_FILE = "metrics.jsonl"


def read_metrics(directory: Path) -> list[dict]:
    """The log's rows; a last line torn by a killed run is dropped (the rows are appended)."""
    lines = [line for line in (Path(directory) / METRICS_FILE).read_text().splitlines() if line]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


class MetricsLog:
    """Written by the main rank only. On resume, rows past the resumed iteration (from the run
    that was killed) are dropped so the log matches the training that actually continues."""

    def __init__(self, directory: Path, is_main: bool, after: int = 0):
        self.path = Path(directory) / METRICS_FILE
        self.is_main = is_main
        self.tb = None
        if not is_main:
            return
        if self.path.exists():
            keep = [r for r in read_metrics(self.path.parent) if r["iteration"] <= after]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(directory) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["iteration"])

    def close(self, plot: bool = True) -> None:
        if not self.is_main:
            return
        if self.tb is not None:
            self.tb.close()
        if plot:
            plot_losses(self.path, self.path.with_name("loss.png"))


def val_lm_first_last(directory: Path) -> tuple[float, float]:
    """Held-out LM loss of a distill run before its first step and after its last."""
    val = [r["val_lm"] for r in read_metrics(directory) if "val_lm" in r]
    return val[0], val[-1]


def plot_losses(metrics: Path, png: Path) -> Path | None:
    from megatron_minitron.plots import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    rows = read_metrics(Path(metrics).parent)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("kd", "--"), ("lm", ":"), ("val_loss", "o-"),
                       ("val_lm", "s-")):
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, png)
