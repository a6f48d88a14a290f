"""The scores' costs join the plan's run-total estimate, and a run counts what was estimated."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.config import EvaluationConfig, MethodConfig, PreprocessConfig, TargetConfig, parse_config
from esegeta_engine.evaluation.costs import SCORE_COSTS, ScoredMap, map_score_cost, parameterised_layers
from esegeta_engine.explain import Explainer
from esegeta_engine.io import Volume
from esegeta_engine.pipeline import iter_run

from tiny_models import TinySegNet


def test_every_score_registers_its_cost_beside_itself():
    map_score_cost(EvaluationConfig(), ScoredMap("saliency", None, 1))  # imports the scores
    assert {"road", "region_perturbation", "mprt", "stability", "energy_pointing", "randomisation"} <= set(SCORE_COSTS)
    off = EvaluationConfig(axioms=None)
    assert map_score_cost(off, ScoredMap("saliency", None, 5)) == 0


def test_costs_follow_the_config_by_hand():
    cfg = EvaluationConfig(road={"percentages": [0.2, 0.4, 0.6], "batch_size": 2},
                           mprt={"variant": "smooth", "samples": 3, "max_stages": 2},
                           randomisation={"mode": "both", "max_stages": 4}, energy_pointing={})
    scored = ScoredMap("saliency", None, 5, plain_evaluations=1, stages=3)
    road = -(-(1 + 2 * 3) // 2)  # the unperturbed copy and two curves of 3, 2 copies a call
    mprt = 3 * (1 + 2) * 5  # samples x (original + 2 stages) re-runs, with the noise tunnel
    randomisation = 2 * (1 + 3 + 2) * 1  # both modes x (original, 3 stages, 2 null networks), bare method
    assert map_score_cost(cfg, scored) == road + mprt + randomisation
    assert map_score_cost(cfg, scored, after_run=False) == road + mprt
    assert map_score_cost(cfg, ScoredMap("saliency", None, None, stages=3)) is None  # re-runs of unknown cost


def test_parameterised_layers_are_the_randomisation_stages():
    from esegeta_engine.evaluation.randomisation import execution_order

    for dims in (2, 3):
        net = TinySegNet(dims)
        x = torch.zeros((1, 1) + (8,) * dims)
        assert parameterised_layers(net) == len(execution_order(net, x))


@pytest.mark.parametrize("dims", [2, 3])
def test_the_estimate_counts_road_and_mprt(dims):
    vol = Volume(np.random.default_rng(0).random((8,) * dims).astype(np.float32), np.eye(4))
    ex = Explainer(TinySegNet(dims).eval(), preprocess=PreprocessConfig(spatial_dims=dims),
                   target=TargetConfig(classes=[1]))
    methods = [MethodConfig(name="saliency"), MethodConfig(name="integrated_gradients", params={"n_steps": 4})]
    alone = ex.estimate([vol], methods)
    cfg = EvaluationConfig(road={"percentages": [0.3, 0.6], "batch_size": 5}, mprt={"variant": "efficient"})
    with_scores = ex.estimate([vol], methods, cfg)
    ig = ex.estimate([vol], methods[1:])
    # ROAD: 5 copies in one call per map; efficient MPRT: two re-runs of each method
    assert with_scores == alone + 2 * 1 + 2 * (alone - ig) + 2 * ig


@pytest.mark.parametrize("variant", ["smooth", "efficient"])
def test_a_run_counts_what_its_estimate_counted(tmp_path, variant, capsys):
    torch.manual_seed(0)
    torch.save(TinySegNet(3).state_dict(), tmp_path / "model.pt")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)),
             tmp_path / "vol.nii.gz")
    mprt = {"variant": variant, "samples": 2, "max_stages": 2}
    cfg = parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"], "target": {"classes": [0, 1]},
        "methods": [{"name": "saliency"}, {"name": "input_x_gradient", "noise_tunnel": {"samples": 3}}],
        "output": {"dir": "out"},
        "evaluation": {"road": {"percentages": [0.25, 0.5]}, "mprt": mprt,
                       "randomisation": {"max_stages": 2, "methods": ["saliency"]}}}, base=tmp_path)
    gen = iter_run(cfg)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    manifest = json.loads(result.manifest_path.read_text())
    est = manifest["estimated_model_evaluations"]
    methods = sum(r["model_evaluations"] for r in manifest["results"])
    scores = sum(r["metric_evaluations"] for r in manifest["results"])
    phase = sum(e["evaluations"] for e in manifest["randomisation"])
    assert methods == sum(r["expected_evaluations"] for r in manifest["results"]) and len(manifest["results"]) == 4
    assert scores > 0 and phase > 0
    assert all(r["metric_evaluations"] == r["expected_metric_evaluations"] for r in manifest["results"])
    # every parameterised layer of the tiny net is reached, so the estimate is exact, not only a bound
    assert manifest["model_evaluations"] == methods + scores + phase == est
    # the run's progress counted the scores against an expected total that had them in
    last = [e for e in events if getattr(e, "run_expected", None) is not None][-1]
    assert last.run_evaluations == last.run_expected == methods + scores
    from esegeta_engine.cli_commands import _print_summary

    _print_summary(result)
    assert f"model evaluations (methods and scores): {est}, estimated {est} before the run" in capsys.readouterr().out


def test_the_cohort_dry_run_shows_the_total_with_the_scores(tmp_path, capsys):
    import yaml

    from cohort_helpers import cohort_data, write_phantoms
    from esegeta_engine.cli import main
    from esegeta_engine.cohort.config import parse_cohort_config
    from esegeta_engine.cohort.plan import plan_cohort

    write_phantoms(tmp_path / "data", n=2)
    data = cohort_data(tmp_path)
    bare = plan_cohort(parse_cohort_config(data))
    data["evaluation"] = {"road": {"percentages": [0.5], "batch_size": 3}, "mprt": {"variant": "efficient"}}
    scored = plan_cohort(parse_cohort_config(data))
    methods = sum(j.cost for j in bare.jobs)
    # per map: ROAD's 3 copies in one call, efficient MPRT's two re-runs of the method
    assert scored.estimated_evaluations == methods + len(bare.jobs) * 1 + 2 * methods
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "cohort.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"about {scored.estimated_evaluations} model evaluations ({len(bare.jobs) + 2 * methods} of them " \
           "for the scores)" in out


@pytest.mark.parametrize("dims", [2, 3])
def test_the_estimate_leaves_out_a_batch_method_the_run_refuses(dims):
    """feature_permutation on one volume, or under a sliding window, is refused before any work; the run's
    estimate (the manifest's ``estimated_model_evaluations``) still counted it: 18 for a run of 1."""
    from esegeta_engine.config import ExecutionConfig

    rng = np.random.default_rng(0)
    vols = [Volume(rng.random((16,) * dims).astype(np.float32), np.eye(4)) for _ in range(2)]
    saliency, permutation = MethodConfig(name="saliency"), MethodConfig(name="feature_permutation")
    whole = Explainer(TinySegNet(dims).eval(), preprocess=PreprocessConfig(spatial_dims=dims),
                      target=TargetConfig(classes=[1]))
    assert whole.estimate(vols[:1], [saliency, permutation]) == whole.estimate(vols[:1], [saliency])
    assert whole.estimate(vols, [saliency, permutation]) > whole.estimate(vols, [saliency])  # two: it runs
    window = Explainer(TinySegNet(dims).eval(), preprocess=PreprocessConfig(spatial_dims=dims),
                       target=TargetConfig(classes=[1]), execution=ExecutionConfig(patch_size=8))
    assert window.estimate(vols, [saliency, permutation]) == window.estimate(vols, [saliency])
