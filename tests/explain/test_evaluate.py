import torch

from conftest import tiny_vit
from vitkit.explain.evaluate import area_under, deletion_insertion_curves, patch_mask


def test_patch_mask_shows_the_first_patches_of_each_order():
    order = torch.stack([torch.randperm(9) for _ in range(4)])
    mask = patch_mask(order, 4, grid=3, patch=2)
    assert mask.shape == (4, 1, 6, 6)
    for b in range(4):
        for p in range(9):
            r, c = divmod(p, 3)
            block = mask[b, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]
            expected = 1.0 if p in order[b, :4].tolist() else 0.0
            assert (block == expected).all()


def test_curve_end_points_and_ordering():
    model = tiny_vit()
    x = torch.randn(5, 3, 8, 8)
    labels = torch.randint(0, 4, (5,))
    curves = deletion_insertion_curves(model, x, torch.rand(5, 16), steps=4, labels=labels)
    assert curves["deletion_prob"].shape == (5, 5)
    clean = model(x).softmax(1).max(1).values
    blank = model(torch.zeros_like(x)).softmax(1).gather(1, model(x).argmax(1, keepdim=True))[:, 0]
    torch.testing.assert_close(curves["deletion_prob"][:, 0], clean)  # nothing removed yet
    torch.testing.assert_close(curves["insertion_prob"][:, -1], clean)  # everything revealed
    torch.testing.assert_close(curves["deletion_prob"][:, -1], blank)
    torch.testing.assert_close(curves["insertion_prob"][:, 0], blank)
    assert (curves["deletion_kept"][:, 0] == 1).all()
    assert torch.equal(curves["insertion_correct"][:, -1], (model(x).argmax(1) == labels).float())


def test_area_under_a_line():
    assert abs(area_under(torch.linspace(0, 1, 11)) - 0.5) < 1e-6
    assert area_under(torch.ones(5)) == 1.0


def test_scores_do_not_depend_on_batching():
    from vitkit.explain.evaluate import evaluate_explanations

    model = tiny_vit()
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 4, (6,))
    fixed = {"a": torch.rand(6, 16), "b": torch.rand(6, 16)}

    def relevance_for(xb, method):  # each image keeps its own relevance, whatever batch it lands in
        rows = [int((x == xb[i]).flatten(1).all(1).nonzero()[0]) for i in range(len(xb))]
        return fixed[method][rows]

    one, _ = evaluate_explanations(model, lambda: [(x, y)], relevance_for, methods=("a", "b"), steps=4)
    two, curves = evaluate_explanations(model, lambda: [(x[:2], y[:2]), (x[2:], y[2:])], relevance_for,
                                        methods=("a", "b"), steps=4)
    assert one.keys() == two.keys() and all(abs(one[k] - two[k]) < 1e-6 for k in one)
    whole = deletion_insertion_curves(model, x, fixed["a"], 4, y)
    assert abs(one["a_deletion_auc"] - area_under(whole["deletion_prob"].mean(0))) < 1e-6
    assert abs(one["a_insertion_accuracy_auc"] - area_under(whole["insertion_correct"].mean(0))) < 1e-6
    assert curves["b"]["deletion"].shape == (5,)
