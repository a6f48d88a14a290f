"""Reproducibly train the embedded sample models on procedural phantoms.

Usage::

    python -m esegeta_engine.sample.train [--out DIR] [--seed 0]

Trains the 3D vessel U-Net and the tiny 2D vessel classifier, evaluates both
on freshly generated held-out phantoms and writes the weights (state dict and
TorchScript) plus ``sample_info.json`` into ``DIR`` (default: the package's
``sample/data`` folder). Inputs are min-max normalised to [0, 1] per image and
kept in NIfTI (x, y, z) axis order, exactly as documented in the JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esegeta_engine.io import atomic_write, write_text
from esegeta_engine.sample.nets import TinyClassifier2D, UNet
from esegeta_engine.sample.phantom import make_phantom, make_phantom_2d, minmax_normalise

DATA_DIR = Path(__file__).resolve().parent / "data"
PREPROCESS = {
    "normalisation": "minmax",
    "range": [0.0, 1.0],
    "axis_order": "xyz",
    "description": "per-image (x - min) / (max - min) on the whole volume/image, "
    "array kept in NIfTI voxel order (x, y, z); add batch and channel dims",
}
UNET_KWARGS: dict[str, Any] = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                               "features": [8, 16, 32]}
CLS_KWARGS: dict[str, Any] = {"in_channels": 1, "n_classes": 2}
UNET_CROP, UNET_BATCH, UNET_LR = 48, 2, 3e-3
CLS_BATCH, CLS_LR = 32, 5e-3
SHAPE_3D = (64, 64, 64)
SHAPE_2D = (64, 64)
# Disjoint phantom seed ranges (training vs. held-out evaluation).
UNET_TRAIN_SEEDS = range(100_000, 100_064)
UNET_EVAL_SEEDS = range(900_000, 900_005)
CLS_TRAIN_SEEDS = range(200_000, 202_000)
CLS_EVAL_SEEDS = range(910_000, 910_200)


def _seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 if both are empty)."""
    p, t = pred.astype(bool), target.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.softmax(logits, dim=1)[:, 1]
    fg = (target == 1).float()
    inter = (prob * fg).sum()
    return 1.0 - (2.0 * inter + 1.0) / (prob.sum() + fg.sum() + 1.0)


def _random_crop(
    rng: np.random.Generator, vol: np.ndarray, mask: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    starts = [int(rng.integers(0, s - size + 1)) for s in vol.shape]
    sl = tuple(slice(s, s + size) for s in starts)
    v, m = vol[sl], mask[sl]
    for ax in range(vol.ndim):
        if rng.random() < 0.5:
            v, m = np.flip(v, ax), np.flip(m, ax)
    return np.ascontiguousarray(v), np.ascontiguousarray(m)


def train_unet(seed: int, iterations: int, crop: int, batch: int, lr: float) -> UNet:
    """Train the 3D vessel U-Net on random crops of a pool of phantoms."""
    rng = np.random.default_rng(seed)
    pool = []
    for s in UNET_TRAIN_SEEDS:
        ph = make_phantom(SHAPE_3D, seed=s)
        pool.append((minmax_normalise(ph.volume), ph.mask))
    model = UNet(**UNET_KWARGS)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations,
                                                pct_start=0.1)
    t0 = time.perf_counter()
    for it in range(iterations):
        crops = [_random_crop(rng, *pool[int(rng.integers(len(pool)))], crop)
                 for _ in range(batch)]
        x = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
        y = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64))
        logits = model(x)
        loss = F.cross_entropy(logits, y) + _soft_dice_loss(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iterations - 1:
            print(f"[unet] it {it:4d}/{iterations} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval()


def evaluate_unet(model: UNet) -> dict[str, Any]:
    """Dice of the U-Net (and of the best global threshold) on held-out phantoms."""
    scores, thr_scores = [], []
    with torch.no_grad():
        for s in UNET_EVAL_SEEDS:
            ph = make_phantom(SHAPE_3D, seed=s)
            vol = minmax_normalise(ph.volume)
            pred = model(torch.from_numpy(vol)[None, None]).argmax(1)[0].numpy()
            scores.append(dice(pred, ph.mask))
            thr_scores.append(max(dice(vol > t, ph.mask) for t in np.linspace(0.1, 0.9, 81)))
    return {"metric": "dice", "seeds": list(UNET_EVAL_SEEDS),
            "per_seed": [round(v, 4) for v in scores],
            "mean": round(float(np.mean(scores)), 4), "min": round(float(np.min(scores)), 4),
            "best_global_threshold_dice_mean": round(float(np.mean(thr_scores)), 4)}


def _phantom_2d_batch(seeds: range, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, labels = [], []
    for i, s in enumerate(seeds):
        ph = make_phantom_2d(SHAPE_2D, seed=s, has_vessel=(i % 2 == 0) if balanced else None)
        imgs.append(minmax_normalise(ph.image))
        labels.append(ph.label)
    return torch.from_numpy(np.stack(imgs)[:, None]), torch.tensor(labels)


def train_classifier(seed: int, iterations: int, batch: int, lr: float) -> TinyClassifier2D:
    """Train the tiny 2D vessel / no-vessel classifier."""
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = _phantom_2d_batch(CLS_TRAIN_SEEDS, balanced=True)
    model = TinyClassifier2D(**CLS_KWARGS)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations)
    for it in range(iterations):
        idx = torch.randint(len(y_all), (batch,), generator=gen)
        x = x_all[idx]
        flip = [d for d in (2, 3) if torch.rand(1, generator=gen).item() < 0.5]
        if flip:
            x = torch.flip(x, flip)
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 100 == 0 or it == iterations - 1:
            print(f"[cls] it {it:4d}/{iterations} loss {loss.item():.4f}", flush=True)
    return model.eval()


def evaluate_classifier(model: TinyClassifier2D) -> dict[str, Any]:
    """Accuracy of the classifier on held-out 2D phantoms (random labels)."""
    x, y = _phantom_2d_batch(CLS_EVAL_SEEDS, balanced=False)
    with torch.no_grad():
        pred = model(x).argmax(1)
    return {"metric": "accuracy", "seeds": [CLS_EVAL_SEEDS.start, CLS_EVAL_SEEDS.stop],
            "n": len(y), "positives": int(y.sum()),
            "accuracy": round(float((pred == y).float().mean()), 4)}


def _save(model: torch.nn.Module, out: Path, stem: str) -> dict[str, str]:
    state, script = f"{stem}.state.pt", f"{stem}.torchscript.pt"
    with atomic_write(out / state) as tmp:
        torch.save(model.state_dict(), tmp)
    with warnings.catch_warnings(), atomic_write(out / script) as tmp:  # TorchScript is shipped on purpose
        warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
        torch.jit.script(model.eval()).save(str(tmp))
    return {"state": state, "torchscript": script}


def _entry(cls_name: str, kwargs: dict[str, Any], task: str, classes: list[str],
           shape: tuple[int, ...], generator: str) -> dict[str, Any]:
    return {"class_path": f"esegeta_engine.sample.nets:{cls_name}", "kwargs": kwargs,
            "task": task, "classes": classes, "output": "logits",
            "input_shape": [1, 1, *shape],
            "phantom": {"generator": f"esegeta_engine.sample.phantom:{generator}",
                        "shape": list(shape)}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the written ``sample_info`` dict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--unet-iters", type=int, default=500, help="U-Net training steps")
    ap.add_argument("--cls-iters", type=int, default=800, help="classifier training steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared, loaded CPU)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    common = {"seed": args.seed, "threads": args.threads, "deterministic": True,
              "optimizer": "Adam + OneCycleLR"}

    _seed_everything(args.seed, args.threads)
    t0 = time.perf_counter()
    unet = train_unet(args.seed, args.unet_iters, UNET_CROP, UNET_BATCH, UNET_LR)
    t_unet = time.perf_counter() - t0
    unet_info = _entry("UNet", UNET_KWARGS, "segmentation", ["background", "vessel"],
                       SHAPE_3D, "make_phantom")
    unet_info["files"] = _save(unet, args.out, "unet3d_vessels")
    unet_info["training"] = {
        **common, "iterations": args.unet_iters, "batch_size": UNET_BATCH,
        "crop": [UNET_CROP] * 3, "lr": UNET_LR, "loss": "cross_entropy + soft_dice",
        "augmentation": "random crops + flips of whole-volume-normalised phantoms",
        "phantom_seeds": [UNET_TRAIN_SEEDS.start, UNET_TRAIN_SEEDS.stop],
        "time_s": round(t_unet, 1)}
    unet_info["evaluation"] = evaluate_unet(unet)
    print(f"[unet] held-out Dice {unet_info['evaluation']['per_seed']}", flush=True)

    _seed_everything(args.seed, args.threads)
    t1 = time.perf_counter()
    cls = train_classifier(args.seed, args.cls_iters, batch=CLS_BATCH, lr=CLS_LR)
    t_cls = time.perf_counter() - t1
    cls_info = _entry("TinyClassifier2D", CLS_KWARGS, "classification", ["no_vessel", "vessel"],
                      SHAPE_2D, "make_phantom_2d")
    cls_info["files"] = _save(cls, args.out, "classifier2d")
    cls_info["training"] = {
        **common, "iterations": args.cls_iters, "batch_size": CLS_BATCH, "lr": CLS_LR,
        "loss": "cross_entropy", "augmentation": "random flips",
        "phantom_seeds": [CLS_TRAIN_SEEDS.start, CLS_TRAIN_SEEDS.stop],
        "time_s": round(t_cls, 1)}
    cls_info["evaluation"] = evaluate_classifier(cls)
    print(f"[cls] held-out accuracy {cls_info['evaluation']['accuracy']:.4f}", flush=True)

    info: dict[str, Any] = {
        "format_version": 1,
        "preprocess": PREPROCESS,
        "torch_version": torch.__version__,
        "total_time_s": round(time.perf_counter() - t0, 1),
        "models": {"unet3d_vessels": unet_info, "classifier2d": cls_info},
    }
    write_text(json.dumps(info, indent=2) + "\n", args.out / "sample_info.json")
    print(f"wrote {args.out} in {info['total_time_s']:.0f}s")
    return info


if __name__ == "__main__":
    main()
