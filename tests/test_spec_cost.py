"""The speculation planner's draft cost (issue 22, item 4): a quantized draft is costed with the fused
kernel's measured rates, scaled from one matrix of each shape to all its quantized bytes; a float draft
keeps the mat-vec / matmul rates. The kernel's measurement itself runs the kernels decode runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from offload_rt.memory import calibrate
from offload_rt.memory.microbench import measure_quant_rows
from offload_rt.memory.plan import Bandwidths
from offload_rt.spec import budget as budget_mod
from offload_rt.spec import setup
from storage.formats import FORMATS
from storage.store import TensorInfo

LAYERS, HIDDEN, FFN, VOCAB = 4, 64, 128, 256
BW = Bandwidths(disk_read=1e9, mem_read=1e10, matvec=1e10, layer_s=2e-4, token_s=1e-4)


class Store:
    """The store interface pass_cost reads: tensor names and their infos."""

    def __init__(self, fmt: str):
        f = FORMATS[fmt]
        shapes = {"embed": (VOCAB, HIDDEN), "norm": (HIDDEN,)}
        for i in range(LAYERS):
            shapes |= {f"l{i}.q": (HIDDEN, HIDDEN), f"l{i}.up": (FFN, HIDDEN), f"l{i}.down": (HIDDEN, FFN),
                       f"l{i}.norm": (HIDDEN,)}
        self.infos = {n: TensorInfo(n, f if len(s) == 2 else FORMATS["float32"], s,
                                    (f if len(s) == 2 else FORMATS["float32"]).nbytes(s)) for n, s in shapes.items()}
        self.tensor_names = list(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]


def model(fmt: str, dtype=torch.float32):
    return SimpleNamespace(store=Store(fmt), dtype=dtype, args=SimpleNamespace(num_hidden_layers=LAYERS))


@pytest.fixture
def rates(monkeypatch):
    """Stubbed measurements: the quantized kernel's (one row, each further row) and the matmul rate."""
    asked = []

    def quant_rows_cost(fmt, shapes, **kw):
        asked.append((fmt, list(shapes)))
        return 1e-3, 1e-5

    monkeypatch.setattr(calibrate, "quant_rows_cost", quant_rows_cost)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a, **k: 1e11)
    return asked


def test_a_quantized_draft_is_costed_with_the_fused_kernels_rates(rates):
    draft, target = model("q4_1"), model("float32")
    placement = SimpleNamespace(predicted_s_per_token=0.3)
    cost = setup.pass_cost(target.store, torch.float32, placement, BW, draft, "cpu")
    f = FORMATS["q4_1"]
    distinct = [(HIDDEN, FFN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (VOCAB, HIDDEN)]
    assert rates == [("q4_1", sorted(distinct))]  # one matrix of each shape measured
    total = sum(i.nbytes for i in draft.store.infos.values() if len(i.shape) == 2)
    scale = total / sum(f.nbytes(s) for s in distinct)
    assert cost.draft_fixed_s == pytest.approx(1e-3 * scale + LAYERS * BW.layer_s + BW.token_s)
    assert cost.draft_token_s == pytest.approx(1e-5 * scale)
    assert cost.target_fixed_s == 0.3


def test_a_float_draft_keeps_the_matvec_and_matmul_rates(rates):
    draft, target = model("float32"), model("float32")
    cost = setup.pass_cost(target.store, torch.float32, SimpleNamespace(predicted_s_per_token=0.3), BW, draft, "cpu")
    assert rates == []
    dweights = sum(i.nbytes for i in draft.store.infos.values())
    assert cost.draft_fixed_s == pytest.approx(dweights / BW.matvec + LAYERS * BW.layer_s + BW.token_s)
    assert cost.draft_token_s == pytest.approx(2.0 * setup.matrix_params(draft.store) / 1e11)


def test_a_cheaper_draft_never_gets_a_smaller_budget():
    """What the measured rate changes: the cheaper the draft's calls, the larger (or equal) the chosen tree."""
    def chosen(fixed: float) -> int:
        cost = budget_mod.PassCost(target_fixed_s=0.3, target_token_s=1e-3, draft_fixed_s=fixed, draft_token_s=1e-4)
        return budget_mod.choose_budget(cost, budget_mod.AGREEMENT_SELF_INT4)

    picks = [chosen(f) for f in (0.08, 0.02, 0.005, 0.001)]
    assert picks == sorted(picks) and picks[-1] > picks[0], picks


def test_the_kernel_measurement_runs_one_and_many_rows():
    one, row = measure_quant_rows("q4_1", [(64, 64), (128, 64)], tokens=16, reps=2)
    assert one > 0 and row >= 0
