"""PNG plots of a benchmark report (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def _bars(ax, names: list[str], values: list[float], title: str, ylabel: str) -> None:
    ax.bar(range(len(values)), values, color=["#999" if "hf" in n or "sdpa" in n or "floor" in n else "#2a7"
                                              for n in names])
    ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def _tok_s(row: dict) -> tuple[list[str], list[float]]:
    items = []
    for k, v in row.items():
        if isinstance(v, dict) and "tok_s" in v:
            items.append((k, v["tok_s"]))
            if "tok_s" in v.get("in_order", {}):  # the same engine with async scheduling off
                items.append((f"{k}, in order", v["in_order"]["tok_s"]))
    return [k for k, _ in items], [v for _, v in items]


def plot_decode(suite: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rows = [(k, suite[k]) for k in ("batch_1", "batch_16") if k in suite]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4))
    for ax, (key, row) in zip(axes if len(rows) > 1 else [axes], rows):
        _bars(ax, *_tok_s(row), f"decode {key.replace('_', ' ')} ({suite['device']})", "tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_engine(suite: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    names, values = _tok_s(suite)
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, names, values, f"{suite.get('requests')} mixed requests ({suite['device']})", "generated tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_serving(suite: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rates = [(float(k), v) for k, v in suite.get("rates", {}).items() if "tok_s" in v]
    if not rates:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r for r, _ in rates]
    for key, label in (("ttft", "time to first token"), ("tbt", "time between tokens")):
        ax = axes[0] if key == "ttft" else axes[1]
        for q in ("p50", "p99"):
            ax.plot(x, [1e3 * (v[f"{key}_{q}"] or 0) for _, v in rates], marker="o", label=q)
        ax.set_xscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(f"{label} ({suite['device']})", fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_attention(suite: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    batches = [b for b in ("mixed", "prefill", "decode", "verify", "long_decode") if isinstance(suite.get(b), dict)]
    if not batches:
        return None
    keys = [("ours_us", "xyserve"), ("sdpa_per_request_us", "SDPA per request"), ("varlen_us", "FA varlen"),
            ("flex_us", "flex"), ("floor_us", "floor")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        ax.bar([j + i * width for j in range(len(batches))], [suite[b].get(k) or 0 for b in batches], width, label=label)
    ax.set_xticks([j + 0.4 for j in range(len(batches))], batches)
    ax.set_ylabel("microseconds (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"meta-attention ({suite.get('device')})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    made = []
    for name, fn in (("decode", plot_decode), ("engine", plot_engine), ("serving", plot_serving),
                     ("attention", plot_attention)):
        suite = report["suites"].get(name)
        if isinstance(suite, dict) and "error" not in suite and "skipped" not in suite:
            try:
                p = fn(suite, out_dir / f"{name}.png")
            except Exception as e:  # a plot must never lose the numbers
                print(f"plot {name} failed: {type(e).__name__}: {e}")
                p = None
            if p:
                made.append(p)
    gemm_png = out_dir / "bench_gemm.png"
    if gemm_png.exists():
        made.append(gemm_png)
    return made
