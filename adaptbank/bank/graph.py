"""The bank as a networkx graph: tasks, shared-A groups, lineage, and expert-similarity edges.

Similarity of two LoRA tasks is the cosine of their dense updates, averaged over the layers both
adapt, computed without forming ``dW = s B A`` (O x I): with ``dW_1 = s_1 B_1 A_1`` and
``dW_2 = s_2 B_2 A_2``, ``<dW_1, dW_2>_F = s_1 s_2 sum((B_1^T B_2) * (A_1 A_2^T))``, an ``r x r``
product. Tasks of other kinds compare by the cosine of their flattened expert tensors; (IA)^3 scales
``l`` (which start at one) compare by their change ``l - 1``, so two untrained tasks are not "similar".
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import torch
from torch import Tensor

if TYPE_CHECKING:
    from adaptbank.bank.facade import AdapterBank

__all__ = ["lora_similarity", "bank_graph", "write_graph", "SIMILARITY_NEIGHBOURS"]

SIMILARITY_NEIGHBOURS = 3
"""Each task links to its most similar tasks, this many at most (a k-nearest-neighbour graph, which
stays readable with hundreds of tasks where all pairs would not)."""


def _frob(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
    """``<B_1 A_1, B_2 A_2>_F`` via the r x r trick (A: (r, I), B: (O, r))."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()  # (r1, r2) * (r1, r2) -> ()


def lora_similarity(e1: dict[str, Tensor], e2: dict[str, Tensor]) -> float | None:
    """Mean over common layers of cos(dW_1, dW_2); tensors keyed ``<layer>.A`` / ``<layer>.B``.
    None when the experts share no layer or an update is zero."""
    layers = sorted({k[:-2] for k in e1 if k.endswith(".B")} & {k[:-2] for k in e2 if k.endswith(".B")})
    sims = []
    for layer in layers:
        a1, b1 = e1[f"{layer}.A"].double(), e1[f"{layer}.B"].double()
        a2, b2 = e2[f"{layer}.A"].double(), e2[f"{layer}.B"].double()
        n1, n2 = _frob(a1, b1, a1, b1).sqrt(), _frob(a2, b2, a2, b2).sqrt()
        if n1 > 0 and n2 > 0:
            sims.append(float(_frob(a1, b1, a2, b2) / (n1 * n2)))
    return sum(sims) / len(sims) if sims else None


def _flat_similarity(e1: dict[str, Tensor], e2: dict[str, Tensor], *, shift: float = 0.0) -> float | None:
    """Cosine of the tensors both experts hold, flattened, less ``shift`` (1 for (IA)^3 scales)."""
    keys = sorted(set(e1) & set(e2))
    if not keys or any(e1[k].shape != e2[k].shape for k in keys):
        return None
    v1 = torch.cat([e1[k].double().flatten() for k in keys]) - shift
    v2 = torch.cat([e2[k].double().flatten() for k in keys]) - shift
    if v1.norm() == 0 or v2.norm() == 0:
        return None
    return float(torch.dot(v1, v2) / (v1.norm() * v2.norm()))


def _expert(bank: AdapterBank, name: str, cfg: dict) -> dict[str, Tensor]:
    tensors = dict(bank.store.read_tensors(name, "adapter"))
    group = cfg.get("shared_group")
    if group is not None:
        tensors |= bank.store.read_shared(group, "A")
    return tensors


def bank_graph(bank: AdapterBank) -> nx.Graph:
    """Nodes: ``task:<name>`` and ``group:<name>``; edges: ``member`` (task in shared-A group),
    ``lineage`` (parent to child) and ``similarity`` (weight = expert cosine similarity)."""
    g = nx.Graph(bank=str(bank.path), base=bank.base["name"])
    configs = {name: bank.store.read_config(name) for name in bank.tasks()}
    for name, cfg in configs.items():
        g.add_node(f"task:{name}", kind="task", method=cfg["method"]["kind"], labels=len(cfg["labels"]),
                   test_accuracy=float(cfg["metrics"].get("test_accuracy") or 0.0))
        if cfg.get("shared_group"):
            g.add_node(f"group:{cfg['shared_group']}", kind="shared-A group")
            g.add_edge(f"task:{name}", f"group:{cfg['shared_group']}", kind="member", weight=1.0)
        if cfg.get("parent") in configs:
            g.add_edge(f"task:{cfg['parent']}", f"task:{name}", kind="lineage", weight=1.0)
    experts = {name: _expert(bank, name, cfg) for name, cfg in configs.items()}
    sims: dict[str, list[tuple[float, str]]] = {name: [] for name in configs}
    for a, b in combinations(configs, 2):
        kinds = {configs[a]["method"]["kind"], configs[b]["method"]["kind"]}
        if kinds == {"lora"}:
            sim = lora_similarity(experts[a], experts[b])
        else:
            sim = _flat_similarity(experts[a], experts[b], shift=1.0 if kinds == {"ia3"} else 0.0)
        if sim is not None:
            sims[a].append((sim, b))
            sims[b].append((sim, a))
    for a, near in sims.items():
        for sim, b in sorted(near, key=lambda p: -abs(p[0]))[:SIMILARITY_NEIGHBOURS]:
            if not g.has_edge(f"task:{a}", f"task:{b}"):
                g.add_edge(f"task:{a}", f"task:{b}", kind="similarity", weight=round(sim, 4))
    return g


def write_graph(g: nx.Graph, path: Path) -> None:
    """Write ``.graphml``, ``.json`` (node-link) or ``.png`` (a drawing) by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix == ".graphml":
        nx.write_graphml(g, path)
    elif suffix == ".json":
        path.write_text(json.dumps(nx.node_link_data(g, edges="edges"), indent=2, default=str))
    elif suffix == ".png":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 6))
        pos = nx.spring_layout(g, seed=0, weight="weight")
        colors = ["#4c72b0" if d.get("kind") == "task" else "#dd8452" for _, d in g.nodes(data=True)]
        nx.draw_networkx_nodes(g, pos, node_color=colors, node_size=600, ax=ax)
        nx.draw_networkx_labels(g, pos, labels={n: n.split(":", 1)[1] for n in g}, font_size=8, ax=ax)
        styles = {"member": "dashed", "lineage": "solid", "similarity": "dotted"}
        for kind, style in styles.items():
            edges = [(u, v) for u, v, d in g.edges(data=True) if d.get("kind") == kind]
            nx.draw_networkx_edges(g, pos, edgelist=edges, style=style, ax=ax)
        ax.set_title("adaptbank: tasks (blue), shared-A groups (orange)")
        ax.axis("off")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    else:
        raise ValueError(f"graph output {str(path)!r} must end in .graphml, .json or .png")
