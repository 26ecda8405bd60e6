"""The run report: report.json and report.md in the run directory, with PNG plots (importance
distributions per axis, parameters vs held-out loss; the distillation loss curve is distill's)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_minitron.checkpoint.atomic import write_text
from megatron_minitron.pipeline.config import RunConfig
from megatron_minitron.plots import pyplot, save

MODELS = ("original", "teacher", "pruned", "distilled")  # original: before teacher correction
PRUNE_RECORD = "pruned.json"  # the prune stage's --json: how units were chosen, auto's candidates


def plot_importance(scores_file: Path, png: Path) -> Path | None:
    """Histogram of each width axis's scores (log scale) and the per-layer depth scores."""
    from megatron_minitron.importance import load_scores

    plt = pyplot()
    if plt is None or not scores_file.is_file():
        return None
    s = load_scores(scores_file)
    axes = {"hidden (embedding channels)": s.hidden(), "attention heads": s.axis("heads"),
            "MLP neurons": s.axis("ffn")}
    fig, ax = plt.subplots(1, len(axes) + 1, figsize=(4 * (len(axes) + 1), 3.2))
    for a, (name, v) in zip(ax, axes.items(), strict=False):
        a.hist(v.flatten().clamp_min(1e-12).log10().numpy(), bins=50)
        a.set_title(name, fontsize=9)
        a.set_xlabel("log10 importance")
    metric = "skip_loss" if any("skip_loss" in k for k in s.tensors) else "block_influence"
    depth = s.layers(metric)
    ax[-1].bar(range(len(depth)), depth.numpy())
    ax[-1].set_title(f"layers ({metric})", fontsize=9)
    ax[-1].set_xlabel("layer")
    return save(fig, png)


def plot_params_vs_loss(rows: dict[str, dict], png: Path) -> Path | None:
    plt = pyplot()
    pts = {k: r for k, r in rows.items() if "loss" in r}
    if plt is None or not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in pts.items():
        ax.scatter(r["parameters"] / 1e6, r["loss"], s=40)
        ax.annotate(name, (r["parameters"] / 1e6, r["loss"]), textcoords="offset points",
                    xytext=(5, 5))
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)
    return save(fig, png)


def plot_layer_widths(record: dict, png: Path) -> Path | None:
    """A heterogeneous student's MLP width per source layer (0 where the MLP or the whole layer
    went), attention kept or removed marked above each bar."""
    plt = pyplot()
    model = record.get("model") or {}
    if plt is None or not model.get("layer_ffn"):
        return None
    source = record["source"]
    width = dict(zip(record["kept_layers"], model["layer_ffn"], strict=True))
    attention = dict(zip(record["kept_layers"], model["layer_attention"], strict=True))
    layers = range(source["num_layers"])
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(layers)), 3.2))
    ax.bar(layers, [width.get(i, 0) for i in layers], color="tab:blue", label="MLP width")
    ax.axhline(source["ffn_hidden_size"], color="gray", lw=0.8, ls="--", label="source width")
    kept = [i for i in layers if attention.get(i)]
    ax.scatter(kept, [source["ffn_hidden_size"] * 1.05] * len(kept), marker="v", s=14,
               color="tab:orange", label="attention kept")
    ax.set_xlabel("source layer")
    ax.set_ylabel("MLP width")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, png)


def write_report(cfg: RunConfig, checkpoints: dict[str, Path], seconds: dict[str, float]
                 ) -> dict:
    from megatron_minitron.checkpoint import mcore

    d = cfg.directory
    rows: dict[str, dict] = {}
    for name in MODELS:
        if name not in checkpoints:
            continue
        m = mcore.read_meta(checkpoints[name]).model
        row = {"checkpoint": str(checkpoints[name]), "parameters": m.num_parameters(),
               "non_embedding_parameters": m.num_parameters(False),
               "shape": {k: getattr(m, k) for k in ("num_layers", "hidden_size",
                                                    "ffn_hidden_size", "num_attention_heads",
                                                    "num_query_groups", "layer_ffn",
                                                    "layer_attention")}}
        ev = d / "eval" / f"{name}.json"
        if ev.is_file():
            e = json.loads(ev.read_text())
            if "loss" in e:
                row.update(loss=e["loss"], perplexity=e["perplexity"], eval_tokens=e["tokens"])
            row["tasks"] = {k: v for k, v in e.get("tasks", {}).items() if k != "perplexity"}
        rows[name] = row
    plots = {"params_vs_loss": plot_params_vs_loss(rows, d / "params_vs_loss.png"),
             "importance": plot_importance(d / "importance" / "scores.safetensors",
                                           d / "importance.png")}
    loss_png = d / "distill" / "loss.png"
    plots["distill_loss"] = loss_png if loss_png.is_file() else None
    record = d / PRUNE_RECORD
    pruned = json.loads(record.read_text()) if record.is_file() else {}
    pruning = {k: v for k, v in pruned.items() if k in ("notes", "candidates")}
    plots["layer_widths"] = plot_layer_widths(pruned, d / "layer_widths.png")
    report = {"name": cfg.name, "models": rows, "pruning": pruning, "stage_seconds": seconds,
              "total_seconds": sum(seconds.values()),
              "plots": {k: str(v.relative_to(d)) for k, v in plots.items() if v is not None}}
    write_text(d / "report.json", json.dumps(report, indent=2))
    write_text(d / "report.md", _markdown(report))
    print(summary(report))
    return report


def summary(report: dict) -> str:
    tasks = sorted({t for r in report["models"].values() for t in r.get("tasks", {})})
    lines = [f"{'model':<10} {'parameters':>14} {'held-out loss':>14} {'perplexity':>11}"
             + "".join(f" {t + ' acc':>{len(t) + 4}}" for t in tasks)]
    for name, r in report["models"].items():
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        accs = [r.get("tasks", {}).get(t, {}).get("acc", float("nan")) for t in tasks]
        lines.append(f"{name:<10} {r['parameters']:>14,} {loss:>14} {ppl:>11}"
                     + "".join(f" {a:>{len(t) + 4}.3f}" for a, t in zip(accs, tasks, strict=True)))
    lines.append(f"total {report['total_seconds']:.0f} s")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    out = [f"# Run report: {report['name']}", "",
           "| model | layers | hidden | ffn | heads / groups | parameters | held-out loss | "
           "perplexity |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        s = r["shape"]
        ffn = (f"{min(s['layer_ffn'])}..{max(s['layer_ffn'])} per layer, attention in "
               f"{sum(s['layer_attention'])}" if s.get("layer_ffn") else s["ffn_hidden_size"])
        out.append(f"| {name} | {s['num_layers']} | {s['hidden_size']} | {ffn} "
                   f"| {s['num_attention_heads']} / {s['num_query_groups']} | "
                   f"{r['parameters']:,} | {r.get('loss', float('nan')):.4f} | "
                   f"{r.get('perplexity', float('nan')):.3f} |")
    tasks = sorted({t for r in report["models"].values() for t in r.get("tasks", {})})
    if tasks:
        out += ["", "| model | " + " | ".join(f"{t} acc" for t in tasks) + " |",
                "|---|" + "---|" * len(tasks)]
        out += [f"| {name} | " + " | ".join(
            f"{r['tasks'][t]['acc']:.3f}" if t in r.get("tasks", {}) else "-" for t in tasks)
            + " |" for name, r in report["models"].items()]
    pruning = report.get("pruning", {})
    if pruning.get("notes"):
        out += ["", "## How the pruned model was chosen", "", *(f"- {n}" for n in pruning["notes"])]
    if pruning.get("candidates"):
        out += ["", "| strategy (--strategy auto) | parameters | calibration loss |",
                "|---|---|---|"]
        out += [f"| {c['strategy']} | {c['parameters']:,} | {c['loss']:.4f} |"
                for c in sorted(pruning["candidates"], key=lambda c: c["loss"])]
    out += ["", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in report["stage_seconds"].items()]
    out += ["", *(f"![{k}]({v})" for k, v in report["plots"].items())]
    return "\n".join(out) + "\n"
