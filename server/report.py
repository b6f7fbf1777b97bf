"""A run's record: ``runs/<id>/metrics.jsonl`` (one JSON object per round), ``report.md`` and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "write_report"]


class MetricsLog:
    """Append-only JSONL of per-round records; each line is flushed as soon as the round ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _plot(records: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.92, wspace=0.22)  # fixed: no layout pass to draw
    axes[0].plot(rounds, [r.get("heldout_wer") for r in records], "o-", label="held-out speakers (server)")
    fed = [(r["round"], r["device_wer"]) for r in records if r.get("device_wer") is not None]
    if fed:
        axes[0].plot(*zip(*fed), "s--", label="devices' local eval (pooled)")
    axes[0].set(xlabel="round", ylabel="WER", title="WER per round")
    axes[0].legend()
    train = [(r["round"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if train:
        axes[1].plot(*zip(*train), "o-")
    axes[1].set(xlabel="round", ylabel="per-token transducer loss", title="device training loss")
    axes[2].bar(rounds, [r.get("train_replies", 0) for r in records], label="replied")
    axes[2].bar(
        rounds, [r.get("train_failures", 0) for r in records], bottom=[r.get("train_replies", 0) for r in records], label="failed"
    )
    axes[2].set(xlabel="round", ylabel="devices", title="devices per round")
    axes[2].legend()
    path = out / "rounds.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    run_dir: Path,
    *,
    title: str,
    config: dict[str, Any],
    records: list[dict[str, Any]],
    breakdowns: dict[str, dict[str, dict[str, float]]],
) -> Path:
    """``breakdowns``: attribute -> value -> {"wer", "words", "speakers"} on the final held-out evaluation
    (evaluation-harness only: built from speakers.tsv, which never reaches a device)."""
    plot = _plot(records, run_dir) if records else None
    lines = [f"# {title}", "", f"Run directory: `{run_dir}`", ""]
    lines += [
        "## Rounds",
        "",
        "| round | held-out WER | device WER (pooled) | train loss | devices ok / failed | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:

        def fmt(key: str, spec: str = ".3f") -> str:
            value = r.get(key)
            return "–" if value is None else format(value, spec)

        lines.append(
            f"| {r['round']} | {fmt('heldout_wer')} | {fmt('device_wer')} | {fmt('train_loss')} | "
            f"{r.get('train_replies', 0)} / {r.get('train_failures', 0)} | {fmt('seconds', '.1f')} |"
        )
    accounted = [r for r in records if r.get("central_dp_epsilon") is not None]
    if accounted:
        last = accounted[-1]
        released = sum(1 for r in records if r.get("central_dp_sample_rate"))
        lines += [
            "",
            f"Device-level DP (`strategy.central-dp`): epsilon {last['central_dp_epsilon']:.2f} at delta "
            f"{config.get('central-dp.delta')} after {released} released rounds (noise multiplier "
            f"{config.get('central-dp.noise-multiplier')}, sample rate {last['central_dp_sample_rate'] or '-'}; "
            "Opacus' RDP accountant).",
        ]
    if plot:
        lines += ["", f"![rounds]({plot.name})"]
    for attribute, groups in breakdowns.items():
        lines += [
            "",
            f"## Final held-out WER by {attribute} (hidden speaker attribute, evaluation only)",
            "",
            f"| {attribute} | WER | words | speakers |",
            "|---|---:|---:|---:|",
        ]
        for value, row in sorted(groups.items(), key=lambda kv: -kv[1]["wer"]):
            lines.append(f"| {value} | {row['wer']:.3f} | {int(row['words'])} | {int(row['speakers'])} |")
        wers = [row["wer"] for row in groups.values()]
        if len(wers) > 1:
            lines.append(f"\nSpread: worst {max(wers):.3f}, best {min(wers):.3f}, gap {max(wers) - min(wers):.3f} absolute.")
    lines += ["", "## Configuration", "", "```", *[f"{k} = {v!r}" for k, v in sorted(config.items())], "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
