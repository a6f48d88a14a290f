"""LRP on MONAI's transformers (UNETR, SwinUNETR): CPU time against forward + backward, and network calls.

For each network, in one process with the order rotating every round (load skews all modes alike):
``reference`` (the target's gradient: one forward and one backward of the network), ``lrp`` with the
held-probability rules of Ali et al. 2022 and ``lrp`` with ``attention_rule: attnlrp``. It reports the
median CPU-time ratio against the reference and counts the network's forward calls (the canonizer's
probe that checks every swapped block against MONAI's own is one of them).

Default: 3D, UNETR at 32^3 (patch 8, hidden 96) and SwinUNETR at 32^3 (feature 12, window 4): a minute on
2 shared cores. ``--full``: both at 96^3, SwinUNETR at feature 24 / window 7 (its defaults), UNETR at
MONAI's default 768 hidden, 12 blocks.

    python benchmarks/bench_lrp_transformers.py [--full] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch


def _nets(full: bool) -> dict:
    from monai.networks.nets import UNETR, SwinUNETR

    torch.manual_seed(0)
    size = 96 if full else 32
    unetr = (UNETR(1, 2, img_size=(size,) * 3, feature_size=16) if full else
             UNETR(1, 2, img_size=(size,) * 3, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4))
    swin = (SwinUNETR(1, 2, feature_size=24) if full else
            SwinUNETR(1, 2, feature_size=12, window_size=4, num_heads=(1, 2, 2, 4), norm_name="batch"))
    return {"UNETR": (unetr.eval(), size), "SwinUNETR": (swin.eval(), size)}


def _run(mode: str, net: torch.nn.Module, x: torch.Tensor, calls: list[int]) -> tuple[float, int]:
    from esegeta_engine.forward.scoring import ScoreModel
    from esegeta_engine.methods.lrp import LRP
    from esegeta_engine.targets import RegionOfInterestTarget

    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    start, before = time.process_time(), calls[0]
    if mode == "reference":
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sm(xg)[0, 1], xg)
    else:
        opts = {"epsilon": 0.01, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None,
                "attention_rule": "attnlrp" if mode == "attnlrp" else "held"}
        LRP(sm, "epsilon_plus", opts).attribute(x, target=1)
    return time.process_time() - start, calls[0] - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="96^3, MONAI's default network sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    modes = ["reference", "held", "attnlrp"]
    for name, (net, size) in _nets(args.full).items():
        calls = [0]
        net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        x = torch.randn(1, 1, *(size,) * 3, generator=torch.Generator().manual_seed(0))
        _run("reference", net, x, calls)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in modes}
        counts: dict[str, int] = {}
        for r in range(args.repeats):
            for mode in modes[r % 3:] + modes[:r % 3]:
                cpu, n = _run(mode, net, x, calls)
                times[mode].append(cpu)
                counts[mode] = n
        ref = median(times["reference"])
        print(f"{name} {size}^3: reference (forward + backward) {ref:.2f} CPU s, {counts['reference']} network call(s)")
        for mode in modes[1:]:
            print(f"  lrp {mode:8s}: CPU ratio {median(times[mode]) / ref:.2f}, {counts[mode]} network call(s)")


if __name__ == "__main__":
    main()
