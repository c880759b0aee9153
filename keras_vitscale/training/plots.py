"""curves.png: loss, accuracy and learning rate against steps (matplotlib Agg)."""

from keras_vitscale.training import run_log


def plot_curves(metrics_path, out_path):
    """Reads metrics.jsonl and writes a three-panel figure to `out_path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = run_log.read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = ((axes[0], ("loss", "val_loss"), "loss"),
              (axes[1], ("accuracy", "val_accuracy"), "accuracy"),
              (axes[2], ("learning_rate",), "learning rate"))
    for ax, keys, title in panels:
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if key.startswith("val") else None,
                        label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
