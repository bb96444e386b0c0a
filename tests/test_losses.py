import pytest
import torch
import torch.nn.functional as F

from clusiam.losses import byol_invariance, cluster_similarity, simsiam_invariance


def authors_cluster_similarity(representations, logits):
    """The cluster term as the authors' code computes it (Wu et al., ICCV 2023): the mean of the
    non-zero upper-triangle similarities of the centres, 1 when there are none."""
    rows = F.normalize(representations, dim=1, eps=1e-8)
    soft = F.gumbel_softmax(logits, tau=1.0, hard=False)
    index = soft.max(dim=-1, keepdim=True)[1]
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0) - soft.detach() + soft
    centres = hard.T @ rows / torch.sum(hard, dim=0).unsqueeze(1).maximum(torch.tensor(1.0))
    centres = F.normalize(centres, dim=1, eps=1e-8)
    upper = torch.triu(centres @ centres.T, diagonal=1).flatten()
    return torch.nan_to_num(upper[torch.nonzero(upper)].mean(), 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_similarity_matches_the_authors_formula_and_gradients(seed):
    generator = torch.Generator().manual_seed(seed)
    representations = torch.randn(96, 32, generator=generator)
    logits = (3 * torch.randn(96, 12, generator=generator)).requires_grad_()

    torch.manual_seed(seed)
    ours = cluster_similarity(representations, logits)
    (our_grad,) = torch.autograd.grad(ours, logits)
    torch.manual_seed(seed)
    theirs = authors_cluster_similarity(representations, logits)
    (their_grad,) = torch.autograd.grad(theirs, logits)

    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert torch.allclose(our_grad, their_grad, atol=1e-7)
    assert our_grad.abs().sum() > 0  # the assignment is trained through the straight-through estimator


def confident_logits(assignment, num_clusters):
    """Logits so peaked that Gumbel noise cannot change the argmax."""
    return F.one_hot(torch.tensor(assignment), num_clusters).float() * 1000.0


def test_orthogonal_centres_score_zero_and_identical_centres_score_one():
    basis = torch.eye(4)
    assignment = [0, 0, 1, 1, 2, 2, 3, 3]
    rows = basis[[a for a in assignment]]
    assert cluster_similarity(rows, confident_logits(assignment, 6)).item() == pytest.approx(0.0, abs=1e-6)
    same_rows = torch.ones(8, 4)
    assert cluster_similarity(same_rows, confident_logits(assignment, 6)).item() == pytest.approx(1.0, abs=1e-6)


def test_only_pairs_of_used_clusters_are_averaged():
    # Clusters 0 and 1 share a direction, cluster 2 is orthogonal; 7 of 10 clusters are empty.
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = cluster_similarity(rows, confident_logits([0, 1, 2], 10))
    assert loss.item() == pytest.approx(1 / 3, abs=1e-6)  # pairs (0,1)=1, (0,2)=0, (1,2)=0


def test_fewer_than_two_used_clusters_give_one():
    rows = torch.randn(16, 8)
    assert cluster_similarity(rows, confident_logits([3] * 16, 5)).item() == 1.0


def test_invariance_losses_span_their_ranges():
    p = torch.randn(10, 6)
    assert simsiam_invariance(p, p, p, p).item() == pytest.approx(-2.0, abs=1e-6)
    assert simsiam_invariance(p, p, -p, -p).item() == pytest.approx(2.0, abs=1e-6)
    assert byol_invariance(p, p, p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_invariance(p, p, -p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_invariance_gradient_stops_at_the_targets():
    p1, p2, t1, t2 = (torch.randn(5, 4, requires_grad=True) for _ in range(4))
    simsiam_invariance(p1, p2, t1, t2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert t1.grad is None and t2.grad is None
