import pytest
import torch
from torch import nn

from clusiam.losses import cluster_similarity
from clusiam.models import METHODS, PretrainModel


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_clusiam_network_has_the_papers_dimensions():
    model = PretrainModel("clusiam", "resnet18", num_clusters=100)
    assert linear_shapes(model.projector) == [(512, 512), (512, 512), (512, 2048)]
    assert not model.projector.layers[-1].affine  # BN(out, affine=False) ends the projector
    assert linear_shapes(model.predictor) == [(2048, 512), (512, 2048)]
    assert linear_shapes(model.cluster_projector) == [(2048, 512)]
    assert (model.cluster_assigner.in_features, model.cluster_assigner.out_features) == (512, 100)
    assert not hasattr(model, "target_backbone")


def test_clubyol_network_has_the_papers_dimensions_and_a_frozen_target():
    model = PretrainModel("clubyol", "resnet18", num_clusters=100)
    assert linear_shapes(model.projector) == [(512, 512), (512, 512), (512, 256)]
    assert linear_shapes(model.predictor) == [(256, 4096), (4096, 256)]
    assert linear_shapes(model.cluster_projector) == [(256, 256)]
    assert model.cluster_assigner.out_features == 100
    assert all(not p.requires_grad for p in model.target_backbone.parameters())
    for online, target in zip(model.backbone.state_dict().values(), model.target_backbone.state_dict().values()):
        assert torch.equal(online, target)  # the target starts as a copy


def test_backbone_is_zero_init_residual_resnet():
    model = PretrainModel("simsiam", "resnet18")
    assert all(block.bn2.weight.abs().sum() == 0
               for layer in (model.backbone.layer1, model.backbone.layer4) for block in layer)
    assert PretrainModel("simsiam", "resnet50").projector.layers[0].in_features == 2048


@pytest.mark.parametrize("model_type", ["simsiam", "byol"])
def test_baselines_have_no_cluster_head(model_type):
    model = PretrainModel(model_type, "resnet18")
    output = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert output.cluster_logits is None
    assert not hasattr(model, "cluster_assigner")


@pytest.mark.parametrize("model_type", ["clusiam", "clubyol"])
def test_cluster_loss_trains_assigner_projectors_and_encoder_but_not_the_target(model_type):
    torch.manual_seed(0)
    model = PretrainModel(model_type, "resnet18", feat_size=64, num_clusters=8)
    # zero_init_residual makes the last BN of each block a zero gate; open it so gradients reach the whole encoder.
    for module in model.backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    output = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    assert all(not t.requires_grad for t in output.targets + output.projections)
    loss = cluster_similarity(torch.cat(output.projections), torch.cat(output.cluster_logits))
    loss.backward()
    for name in ("cluster_assigner", "cluster_projector", "projector", "backbone"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None for p in model.predictor.parameters())  # the cluster loss skips the predictor
    if model_type == "clubyol":
        target = list(model.target_backbone.parameters()) + list(model.target_projector.parameters())
        assert all(p.grad is None for p in target)


def test_target_update_is_an_exponential_moving_average():
    model = PretrainModel("byol", "resnet18", feat_size=32)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_()
        for p in model.projector.parameters():
            p.normal_()
    online = [p.clone() for p in list(model.backbone.parameters()) + list(model.projector.parameters())]
    before = [p.clone() for p in list(model.target_backbone.parameters()) + list(model.target_projector.parameters())]
    model.update_target(0.99)
    after = list(model.target_backbone.parameters()) + list(model.target_projector.parameters())
    for o, b, a in zip(online, before, after):
        assert torch.allclose(a, 0.99 * b + 0.01 * o, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(after, before))


def test_methods_carry_the_papers_defaults():
    assert (METHODS["clusiam"].feat_size, METHODS["clusiam"].alpha) == (2048, 0.5)
    assert (METHODS["clubyol"].feat_size, METHODS["clubyol"].alpha) == (256, 0.9)
    assert METHODS["simsiam"].alpha == METHODS["byol"].alpha == 0.0
