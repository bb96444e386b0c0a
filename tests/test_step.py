import pytest
import torch

from clusiam.models import PretrainModel
from clusiam.step import LossSettings, compute_losses


@pytest.mark.parametrize("model_type, alpha", [("clusiam", 0.5), ("clubyol", 0.9), ("simsiam", 0.0), ("byol", 0.0)])
def test_the_loss_weighs_invariance_and_cluster_terms_by_alpha(model_type, alpha):
    torch.manual_seed(0)
    model = PretrainModel(model_type, "resnet18", feat_size=32, num_clusters=5)
    images = torch.rand(2, 6, 3, 32, 32)
    with torch.no_grad():
        losses = compute_losses(model.method, model(images[0], images[1]), LossSettings(alpha),
                                torch.Generator().manual_seed(1))
    if model.method.clustered:
        expected = (1 - alpha) * losses["invariance"] + alpha * losses["cluster"]
        assert -1 <= float(losses["cluster"]) <= 1 and torch.allclose(losses["loss"], expected)
    else:
        assert "cluster" not in losses and torch.equal(losses["loss"], losses["invariance"])
    low, high = (0.0, 4.0) if model.method.momentum_target else (-2.0, 2.0)
    assert low <= float(losses["invariance"]) <= high
