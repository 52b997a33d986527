"""Pareto plot: tokens/s per GPU against tokens/s per user, one line per ISL/OSL, measured end-to-end
runs (`--e2e`, solid) and the step model (`--sweep`, dashed).

Reads the JSON that `maverick-bench --sweep ... --json FILE` writes; needs matplotlib (not a runtime
dependency: `pip install matplotlib`). `python -m maverick.bench.plot results.json out.png`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def pareto_png(results: dict, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for key, style, what in (("e2e", "-", "measured end to end"), ("sweep", "--", "model over measured steps")):
        points = results.get(key) or []
        for isl, osl in sorted({(p["isl"], p["osl"]) for p in points}):
            pts = sorted((p for p in points if (p["isl"], p["osl"]) == (isl, osl)), key=lambda p: p["concurrency"])
            xs = [p["tokens_per_s_per_user"] for p in pts]
            ys = [p["tokens_per_s_per_gpu"] for p in pts]
            ax.plot(xs, ys, style, marker="o", label=f"ISL/OSL {isl}/{osl} ({what})")
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(str(p["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens/s per user")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(results["header"].split(" command=")[0], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m maverick.bench.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    if not results.get("sweep") and not results.get("e2e"):
        print(f"{argv[0]}: no 'sweep' or 'e2e' results (run maverick-bench with --sweep or --e2e)", file=sys.stderr)
        return 2
    pareto_png(results, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
