"""torch.compile over inference with a fixed set of experts: the one-expert, mixed-batch and routed
forwards trace as one graph each with no graph break (``torch._dynamo.explain``), and the compiled
forward (aot_eager: the traced graph run by autograd's eager kernels, no C++ build) equals eager."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_expert, tiny_backbone

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.core.config import AdapterConfig, IA3Config
from adaptbank.routing.lda import LDARouter
from adaptbank.routing.pools import router_features


def _model(router_layers: int = 0) -> AdaptBankModel:
    torch.manual_seed(0)
    model = AdaptBankModel(tiny_backbone("bert"))
    model.reserved_layers = router_layers
    for name, cfg in (("a", LoRAConfig(rank=2)), ("b", AdapterConfig(bottleneck=4)), ("c", IA3Config())):
        model.add_task(name, cfg, ["x", "y"])
        randomize_expert(model, name)
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("path", ["one-expert", "mixed", "routed"])
def test_inference_paths_trace_without_graph_breaks_and_compile_to_eager_outputs(path):
    torch._dynamo.reset()
    ids, mask = _batch()
    model = _model(router_layers=1 if path == "routed" else 0)
    if path == "routed":
        with torch.no_grad():  # a nearest-prototype router whose prototypes are rows 0-2: they go to a, b, c
            states = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            protos = router_features(states[:2], mask)[:3]  # (3, 2 D)
        model.attach_router(LDARouter(["a", "b", "c"], protos, -0.5 * (protos * protos).sum(1), layers=1))

        def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model.routed_features(ids, mask)[0]  # (B, D)
    else:
        if path == "one-expert":
            model.route(task="a")
        else:
            model.route(task_ids=["a", "b", "c", "a", "c", "b"])

        def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model.features(ids, mask)  # (B, D)

    with torch.no_grad():
        explained = torch._dynamo.explain(fn)(ids, mask)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1
        eager = fn(ids, mask)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(ids, mask)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    if path == "routed":  # the rows really went to several experts
        assert model.routed_features(ids, mask)[1][:3, 0].tolist() == [0, 1, 2]
