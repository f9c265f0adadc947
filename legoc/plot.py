"""Pictures of an artifact: the segment graph with blocks coloured and the frame grey."""
from __future__ import annotations

from pathlib import Path

import networkx as nx


def segment_graph(manifest: dict) -> nx.DiGraph:
    """Graph inputs, segments and the output as nodes; an edge for every tensor between them."""
    g = nx.DiGraph()
    producer = {}
    for inp in manifest["inputs"]:
        g.add_node(f"input {inp['name']}", kind="input", label=f"input {inp['name']}\n{'×'.join(map(str, inp['shape']))}")
        producer[inp["name"]] = f"input {inp['name']}"
    for s in manifest["segments"]:
        macs = s["variants"][0]["macs"] / 1e6
        extra = f"\n{len(s['variants'])} variants" if s["kind"] == "block" else ""
        g.add_node(s["name"], kind=s["kind"], label=f"{s['name']}\n{macs:.2f} M MACs{extra}")
        for t in s["inputs"]:
            g.add_edge(producer[t], s["name"])
        for t in s["outputs"]:
            producer[t] = s["name"]
    g.add_node("output", kind="output", label="output")

    def tensors(spec):
        if "tensor" in spec:
            yield spec["tensor"]
        for key in ("tuple", "list"):
            for sub in spec.get(key, []):
                yield from tensors(sub)
        for sub in spec.get("dict", {}).values():
            yield from tensors(sub)

    for t in tensors(manifest["output"]):
        g.add_edge(producer[t], "output")
    return g


def plot_blocks(manifest: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = segment_graph(manifest)
    layers = list(nx.topological_generations(g))
    pos = {}
    for depth, layer in enumerate(layers):
        for i, n in enumerate(sorted(layer)):
            pos[n] = ((i - (len(layer) - 1) / 2) * 2.2, -depth)
    colours = plt.get_cmap("tab10")
    block_index = {s["name"]: i for i, s in enumerate(s for s in manifest["segments"] if s["kind"] == "block")}
    fill = []
    for n in g.nodes:
        kind = g.nodes[n]["kind"]
        fill.append(colours(block_index[n] % 10) if kind == "block" else ("#bbbbbb" if kind == "frame" else "white"))
    width = max(4.0, 2.4 * max(len(layer) for layer in layers))
    fig, ax = plt.subplots(figsize=(width, 1.3 * len(layers) + 1))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=12, node_size=3000)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=fill, node_shape="s", node_size=3000, edgecolors="black")
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: g.nodes[n]["label"] for n in g.nodes}, font_size=7)
    m = manifest["model"]
    ax.set_title(f"{m['name']} for {manifest['target']['name']}: blocks coloured, frame grey; "
                 f"{m['scalable_share']:.0%} of MACs scalable", fontsize=9)
    ax.axis("off")
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pareto(manifest: dict, path: str | Path) -> Path:
    """Estimated accuracy against latency: every combination (grey), the estimated Pareto front
    (line), the model-grained baseline (the same ratio in every block, squares) and the
    combinations validated by measurement at compile time (measured value, linked to its estimate;
    the latency fit's calibration points apart from the held-out ones) and, when recorded by
    ``legoc evaluate --record``, the test-split accuracy of configurations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from legoc.errors import UserError
    from legoc.runtime.estimate import Profiles

    prof = Profiles(manifest)
    front = prof.pareto_front()
    if not front:
        raise UserError("the artifact has no accuracy or latency figure for some variant, so there is no Pareto "
                        "front to draw; compile with val_data() (or train_data()) in model.py, and for a board "
                        "measure latency with `legoc profile ART --rpc …`")
    scale = 100.0 if prof.metric in ("evaluate", "top1") else 1.0
    unit = "%" if scale == 100.0 else ""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if prof.combinations() <= 20000:
        pts = [(prof.latency_ms(c), prof.accuracy(c)) for c in prof.all_choices()]
        ax.scatter([p[0] for p in pts], [p[1] * scale for p in pts], s=4, c="#cccccc",
                   label=f"all {len(pts)} combinations (estimated)")
    ax.plot([e.latency_ms for _, e in front], [e.accuracy * scale for _, e in front], "-o", ms=3, c="tab:blue",
            label=f"Pareto front (estimated, {len(front)} points)")
    n = min(len(vs) for vs in prof.blocks)
    uni = [prof.estimate([i] * len(prof.blocks)) for i in range(n)]
    ax.plot([e.latency_ms for e in uni], [e.accuracy * scale for e in uni], "s--", c="tab:orange", ms=6,
            label="model-grained: same ratio in every block (estimated)")
    val = [v for v in (manifest.get("combination") or {}).get("validation") or []
           if v["measured"].get("accuracy") is not None]
    for v in val:
        e, m = v["estimated"], v["measured"]
        if e.get("accuracy") is not None:
            ax.plot([e["latency_ms"], m["latency_ms"]], [e["accuracy"] * scale, m["accuracy"] * scale],
                    c="tab:red", lw=0.8, alpha=0.6)
    # The uniform configurations calibrate the latency and accuracy estimators (fitted: in-sample);
    # the Pareto points are held out. Older artifacts do not record which is which.
    for fitted, marker, colour, label in (
            (False, "x", "tab:red", "validated, held out: measured"),
            (True, "+", "tab:purple", "validated, fitted (in-sample: calibration points): measured"),
            (None, "x", "tab:gray", "validated (fit status not recorded): measured")):
        pts = [v["measured"] for v in val if v.get("fitted") is fitted]
        if pts:
            ax.scatter([p["latency_ms"] for p in pts], [p["accuracy"] * scale for p in pts], marker=marker, s=50,
                       c=colour, label=f"{label} ({len(pts)})", zorder=5)
    ev = manifest.get("evaluation")
    if ev and ev.get("results"):
        pts = [r for r in ev["results"] if r.get("est_latency_ms") is not None]
        ax.scatter([r["est_latency_ms"] for r in pts], [r["accuracy"] * scale for r in pts], marker="*", s=90,
                   c="tab:green", zorder=6,
                   label=f"{ev['split']} split (legoc evaluate), at estimated latency ({len(pts)})")
    src = sorted({v.latency_source for vs in prof.blocks for v in vs})
    ax.set_xlabel(f"latency per inference, ms ({', '.join(src)})")
    ax.set_ylabel(f"accuracy{' (' + unit + ')' if unit else ''} — {prof.metric}")
    m = manifest["model"]
    ax.set_title(f"{m['name']} on {manifest['target']['name']}: accuracy vs latency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = Path(path)
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return path
