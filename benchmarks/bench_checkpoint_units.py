"""Peak memory of one nnU-Net patch's checkpointed saliency, in units of one full-resolution feature map.

The network of the 256x256x128 benchmark's plan (PlainConvUNet, features 32..320, six levels) on a reduced
patch, each variant in its own process: the peak resident memory above the process's resting memory, in
units U of one 32-channel float32 tensor at the patch's full resolution (all large tensors scale with U, so
the accounting carries over to the full patch, where U = 262 MB at 80x160x160). ``/proc/self/clear_refs``
resets the peak before the measured pass (a warm-up pass runs first); with ``--where`` a dispatch mode
names the operation running at the peak and prints the resident memory after each operation around it.

    python benchmarks/bench_checkpoint_units.py [--patch 48x96x96] [--kind plain|residual] [--where]

Variants: ``nograd`` (the forward without a graph, as a prediction runs it), ``previous`` (checkpointed,
the last decoder stage's opening recomputed in one step: the scheme before ``forward/checkpoint_opening.py``),
``checkpointed`` (as a run does it now).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import subprocess
import sys
import threading
import time

VARIANTS = ("nograd", "previous", "checkpointed")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def _net(kind: str):
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from torch import nn

    common = dict(input_channels=1, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
                  kernel_sizes=3, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                  num_classes=2, n_conv_per_stage_decoder=[2] * 5, conv_bias=True, norm_op=nn.InstanceNorm3d,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    torch.manual_seed(0)
    net = (PlainConvUNet(n_conv_per_stage=[2] * 6, **common) if kind == "plain"
           else ResidualEncoderUNet(n_blocks_per_stage=[1, 3, 4, 6, 6, 6], **common))
    for p in net.parameters():  # as the engine's own copies of a user's networks are
        p.requires_grad_(False)
    return net.eval()


def child(variant: str, patch: tuple[int, ...], kind: str, where: bool) -> None:
    import torch

    from esegeta_engine.forward import checkpoint_opening
    from esegeta_engine.forward.checkpointing import checkpointed, unet_segments

    torch.set_num_threads(1)
    net = _net(kind)
    x = torch.randn(1, 1, *patch)
    unit = 32 * x[0, 0].numel() * 4 / 2**20
    if variant == "previous":
        checkpoint_opening.MAX_SHIFT = -1.0  # every last stage refused: the opening recomputed in one step

    def run() -> None:
        if variant == "nograd":
            with torch.no_grad():
                net(x)
            return
        xr = x.clone().requires_grad_(True)
        with checkpointed(unet_segments(net)):
            out = net(xr)
            torch.autograd.grad((out[:, 1] * (out.detach().argmax(1) == 1)).sum(), xr)

    run()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    probe = _Where() if where else contextlib.nullcontext()
    with probe:
        run()
    peak = _status("VmHWM")
    print(f"{variant:<13} {kind} {'x'.join(map(str, patch))}: U = {unit:.1f} MB, peak {peak - base:6.0f} MB above "
          f"rest = {(peak - base) / unit:.2f} U", flush=True)
    if where:
        probe.report(base, unit)


class _Where:
    """A dispatch mode that remembers each operation and a sampler that finds the one running at the peak."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log, now = self.log, self.now = [], [None]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                now[0] = (len(log), str(func), [tuple(a.shape) for a in args if hasattr(a, "shape")][:3])
                out = func(*args, **(kwargs or {}))
                log.append((str(func), _status("VmRSS")))
                return out

        self.peak, self.at, self.stop = 0.0, None, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _sample(self) -> None:
        while not self.stop:
            r = _status("VmRSS")
            if r > self.peak:
                self.peak, self.at = r, self.now[0]
            time.sleep(0.0003)

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.stop = True
        self.thread.join()
        return False

    def report(self, base: float, unit: float) -> None:
        if self.at is None:
            return
        i = self.at[0]
        print(f"  at the peak: {self.at[1]} on {self.at[2]}")
        for k in range(max(i - 12, 0), min(i + 3, len(self.log))):
            print(f"  {k:6d} {self.log[k][0]:<45} {(self.log[k][1] - base) / unit:6.2f} U")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", default="48x96x96", help="ZxYxX, multiples of 16x32x32")
    ap.add_argument("--kind", default="plain", choices=("plain", "residual"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--where", action="store_true", help="name the operation at each variant's peak")
    ap.add_argument("--child")
    args = ap.parse_args()
    patch = tuple(int(v) for v in args.patch.split("x"))
    if args.child:
        child(args.child, patch, args.kind, args.where)
        return
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--patch", args.patch, "--kind", args.kind]
        subprocess.run(cmd + (["--where"] if args.where else []), check=True)


if __name__ == "__main__":
    main()
