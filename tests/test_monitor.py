import math

import torch

from clusiam.monitor import CLUSTER_DIAGNOSTICS, cluster_diagnostics, collapse_warnings, projection_std


def averages_of(logits, projections):
    diagnostics = {k: float(v) for k, v in cluster_diagnostics(logits).items()}
    return {**diagnostics, "projection_std": float(projection_std(projections))}


def test_diagnostics_count_clusters_and_shares():
    logits = torch.full((10, 5), -50.0)
    logits[torch.arange(10), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])] = 50.0
    diagnostics = cluster_diagnostics(logits)
    assert tuple(diagnostics) == CLUSTER_DIAGNOSTICS
    assert diagnostics["clusters_argmax"] == 3 and diagnostics["clusters_gumbel"] == 3
    assert diagnostics["largest_cluster_share"] == 0.6
    assert diagnostics["mean_max_probability"] > 0.999


def test_healthy_assignments_raise_no_warning():
    torch.manual_seed(0)
    logits = torch.randn(200, 20) * 5
    assert collapse_warnings(averages_of(logits, torch.randn(200, 64)), 20) == []


def test_one_dominant_cluster_is_collapse_mode_1():
    logits = torch.randn(200, 20)
    logits[:, 7] += 100.0
    warnings = collapse_warnings(averages_of(logits, torch.randn(200, 64)), 20)
    assert len(warnings) == 1 and "collapse mode 1" in warnings[0] and "100%" in warnings[0]


def test_near_uniform_logits_are_collapse_mode_2():
    logits = torch.randn(200, 20) * 1e-3
    warnings = collapse_warnings(averages_of(logits, torch.randn(200, 64)), 20)
    assert len(warnings) == 1 and "collapse mode 2" in warnings[0]


def test_constant_projections_are_reported_as_collapse():
    constant = torch.ones(100, 64) + 1e-4 * torch.randn(100, 64)
    assert projection_std(constant) < 0.01
    assert math.isclose(float(projection_std(torch.randn(4000, 64))), 1.0, abs_tol=0.05)
    warnings = collapse_warnings({"projection_std": float(projection_std(constant))}, None)
    assert len(warnings) == 1 and "collapsing to a constant" in warnings[0]
