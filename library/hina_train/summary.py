"""The end-of-training summary and the loss-curve PNG written beside the network file."""

from __future__ import annotations

from pathlib import Path

from .saving import atomic_write


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the curve the progress bar shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def window_mean(values: list[float], head: bool) -> float:
    n = max(1, len(values) // 10)
    part = values[:n] if head else values[-n:]
    return sum(part) / len(part)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    ax.plot(steps, smoothed(losses), color="#c33", linewidth=1.8, label="smoothed (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss (MSE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png")

    atomic_write(path, write)
    plt.close(fig)


def format_summary(*, steps: int, seconds: float, losses: list[float], output: Path | None, plot: Path | None,
                   optimizer_info: dict | None, samples: list[Path] | None = None) -> str:
    lines = ["", "=== training summary ===", f"steps: {steps}   time: {seconds:.1f} s"
             + (f"   ({steps / seconds:.2f} it/s)" if seconds > 0 else "")]
    if losses:
        lines.append(f"loss: first {losses[0]:.4f} -> last {losses[-1]:.4f}   "
                     f"mean of first 10%: {window_mean(losses, True):.4f} -> last 10%: {window_mean(losses, False):.4f}")
    if output is not None:
        lines.append(f"network: {output}")
    if plot is not None:
        lines.append(f"loss curve: {plot}")
    if samples:
        lines.append(f"sample images: {samples[0]}" + (f" -> {samples[-1]}" if len(samples) > 1 else ""))
    if optimizer_info:
        name = optimizer_info.get("optimizer_type") or optimizer_info.get("name") or ""
        features = optimizer_info.get("features") or optimizer_info.get("enabled_features")
        if isinstance(features, dict):  # flags that are on; numeric settings of enabled flags are listed below
            features = [k for k, v in features.items() if v is True]
        lines.append(f"optimizer: {name}" + (f"   features: {', '.join(map(str, features)) or 'none'}"
                                             if features is not None else ""))
        for key, value in optimizer_info.items():
            if key not in ("optimizer_type", "name", "features", "enabled_features"):
                lines.append(f"  {key}: {value}")
    return "\n".join(lines)
