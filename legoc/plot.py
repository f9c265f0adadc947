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
