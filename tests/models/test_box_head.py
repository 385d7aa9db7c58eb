"""The two-headed box model on a ViT and a ResNet-18 backbone: outputs, features, specs, pre-trained weights."""

import copy

import pytest
import torch
from conftest import WEIGHTS, requires_weights
from safetensors.torch import save_file

from vitkit.data.boxes import square_crops
from vitkit.errors import VitkitError
from vitkit.models.box_head import RESNET18_FEATURES, BoxModel, DenseBoxRegressor, resnet18_backbone, vit_backbone
from vitkit.models.resnet import resnet18


def tiny_box_vit(**head) -> BoxModel:
    torch.manual_seed(0)
    vit = vit_backbone("vit_tiny", image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32)
    return BoxModel(vit, vit.cfg.dim, num_classes=5, hidden=8, **head).eval()


def test_vit_box_model_outputs_logits_and_boxes_from_the_class_token():
    model = tiny_box_vit()
    x = torch.randn(3, 3, 16, 16)
    logits, boxes = model(x)
    assert logits.shape == (3, 5) and boxes.shape == (3, 4)
    assert ((boxes > 0) & (boxes < 1)).all()  # sigmoid
    z, _ = model.backbone.forward_features(x)
    pooled, grid = model.features(x)
    assert torch.equal(pooled, z[:, 0])  # the class token after the final norm
    for row, col in [(0, 0), (0, 3), (2, 1), (3, 3)]:  # 16 px / 4: a 4×4 grid of patch tokens, row-major
        assert torch.equal(grid[:, row, col], z[:, 1 + 4 * row + col])
    assert torch.allclose(boxes, model.regressor(z[:, 0]).sigmoid())
    raw = tiny_box_vit(sigmoid=False)
    assert torch.allclose(raw(x)[1], model.regressor(z[:, 0]))


@pytest.mark.parametrize("box_head", ["mlp", "dense"])
def test_box_scale_stretches_widths_and_heights_in_eval_mode_only(box_head):
    x = torch.randn(3, 3, 16, 16)
    plain = tiny_box_vit(box_head=box_head, dropout=0.0)
    scaled = tiny_box_vit(box_head=box_head, dropout=0.0, box_scale=0.9)
    (logits, boxes), (scaled_logits, scaled_boxes) = plain(x), scaled(x)
    assert torch.equal(logits, scaled_logits) and torch.equal(boxes[:, :2], scaled_boxes[:, :2])
    torch.testing.assert_close(scaled_boxes[:, 2:], 0.9 * boxes[:, 2:])
    assert torch.equal(plain.train()(x)[1], scaled.train()(x)[1])  # training fits the labels as they are


@pytest.mark.parametrize("box_head", ["mlp", "dense"])
def test_flip_tta_averages_an_image_with_its_mirror_in_eval_mode(box_head):
    x = torch.randn(3, 3, 16, 16)
    plain = tiny_box_vit(box_head=box_head, box_scale=0.9, dropout=0.0)
    tta = tiny_box_vit(box_head=box_head, box_scale=0.9, dropout=0.0, flip_tta=True)
    logits, boxes = tta(x)
    # Written out: the two views one by one, the mirror's box reflected about the vertical midline.
    (a, box_a), (b, box_b) = plain(x), plain(x.flip(-1))
    reflected = torch.stack([1 - box_b[:, 0], box_b[:, 1], box_b[:, 2], box_b[:, 3]], dim=1)
    torch.testing.assert_close(logits, (a + b) / 2)
    torch.testing.assert_close(boxes, (box_a + reflected) / 2)
    # So the averaged model is mirror-symmetric: a mirrored image gets the same class scores and the mirrored box.
    mirror_logits, mirror_boxes = tta(x.flip(-1))
    torch.testing.assert_close(mirror_logits, logits)
    torch.testing.assert_close(mirror_boxes[:, 0], 1 - boxes[:, 0])
    torch.testing.assert_close(mirror_boxes[:, 1:], boxes[:, 1:])
    # Training and the per-cell outputs see the images as given.
    assert all(torch.equal(p, q) for p, q in zip(tta.train()(x), plain.train()(x)))
    if box_head == "dense":
        assert all(torch.equal(p, q) for p, q in zip(tta.eval()(x, cells=True), plain.eval()(x, cells=True)))


def test_heads_stay_float32_under_bf16_autocast():
    model = tiny_box_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, boxes = model(torch.randn(2, 3, 16, 16))
    assert logits.dtype == boxes.dtype == torch.float32


def test_vit_grid_skips_a_distillation_token():
    torch.manual_seed(0)
    vit = vit_backbone("vit_tiny", image_size=16, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32)
    vit.cfg.distill_token = True  # rebuilt below with the token
    vit = type(vit)(vit.cfg)
    model = BoxModel(vit, 16, num_classes=5, hidden=8).eval()
    x = torch.randn(2, 3, 16, 16)
    z, _ = vit.forward_features(x)
    pooled, grid = model.features(x)
    assert torch.equal(pooled, z[:, 0]) and grid.shape == (2, 4, 4, 16)
    assert torch.equal(grid.flatten(1, 2), z[:, 2:])  # class and distillation tokens first


def test_resnet_features_are_torchvisions_pooled_feature_and_its_last_map():
    torch.manual_seed(0)
    model = BoxModel(resnet18_backbone(), RESNET18_FEATURES, num_classes=3, hidden=16).eval()
    seen = {}
    model.backbone.layer4.register_forward_hook(lambda module, args, out: seen.update(fmap=out))
    x = torch.randn(2, 3, 64, 128)  # not square: rows and columns must not be swapped
    pooled, grid = model.features(x)
    assert torch.allclose(pooled, model.backbone(x), atol=1e-6)  # torchvision's own forward: avgpool, flatten
    assert grid.shape == (2, 2, 4, RESNET18_FEATURES)  # stride 32
    for row, col in [(0, 0), (0, 3), (1, 2)]:
        assert torch.equal(grid[:, row, col], seen["fmap"][:, :, row, col])


def dense_reference(regressor: DenseBoxRegressor, grid: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """The dense head written out cell by cell: weights, centres, edges, weighted mean (clipped to the image with
    `clip`), then (cx, cy, w, h)."""
    boxes = []
    for features in grid:
        rows, cols, _ = features.shape
        logits, edges = [], []
        for r in range(rows):
            for c in range(cols):
                out = regressor.mlp(features[r, c])
                left, top, right, bottom = out[1:].sigmoid().tolist()
                centre_x, centre_y = (c + 0.5) / cols, (r + 0.5) / rows
                logits.append(out[0])
                edges.append(torch.tensor([centre_x - left, centre_y - top, centre_x + right, centre_y + bottom]))
        weights = torch.stack(logits).softmax(0)
        x1, y1, x2, y2 = (weights[:, None] * torch.stack(edges)).sum(0)
        if clip:
            x1, y1, x2, y2 = (min(max(v.item(), 0.0), 1.0) for v in (x1, y1, x2, y2))
            x1, y1, x2, y2 = (torch.tensor(v) for v in (x1, y1, x2, y2))
        boxes.append(torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]))
    return torch.stack(boxes)


def test_dense_head_matches_its_cell_by_cell_definition():
    torch.manual_seed(0)
    regressor = DenseBoxRegressor(dim=6, hidden=8, dropout=0.0)
    grid = 3 * torch.randn(3, 4, 5, 6)  # not square: rows and columns must not be swapped
    assert torch.allclose(regressor(grid), dense_reference(regressor, grid), atol=1e-6)
    clipped = dense_reference(regressor, grid, clip=True)
    assert torch.allclose(regressor.eval()(grid), clipped, atol=1e-6)  # eval mode keeps the box in the image
    assert not torch.allclose(clipped, dense_reference(regressor, grid), atol=1e-3)  # the clip did something


def test_dense_head_cells_are_its_per_cell_edges_and_centres():
    torch.manual_seed(0)
    regressor = DenseBoxRegressor(dim=6, hidden=8, dropout=0.0)
    grid = 3 * torch.randn(2, 3, 5, 6)
    weight, edges, centres = regressor.per_cell(grid)
    assert torch.equal(regressor.average(weight, edges), regressor(grid))
    assert edges.shape == (2, 15, 4) and centres.shape == (15, 2)
    torch.testing.assert_close(weight.sum(1), torch.ones(2))
    for b, r, c in [(0, 0, 0), (0, 2, 4), (1, 1, 3)]:
        left, top, right, bottom = regressor.mlp(grid[b, r, c])[1:].sigmoid()
        centre_x, centre_y = (c + 0.5) / 5, (r + 0.5) / 3  # cells row by row
        assert torch.allclose(centres[r * 5 + c], torch.tensor([centre_x, centre_y]))
        expected = torch.stack([centre_x - left, centre_y - top, centre_x + right, centre_y + bottom])
        assert torch.allclose(edges[b, r * 5 + c], expected, atol=1e-6)


def test_box_model_gives_cells_for_the_dense_head_only():
    dense = tiny_box_vit(box_head="dense")
    x = torch.randn(2, 3, 16, 16)
    logits, boxes, edges, centres = dense(x, cells=True)
    assert edges.shape == (2, 16, 4) and centres.shape == (16, 2)
    plain_logits, plain_boxes = dense(x)
    assert torch.equal(logits, plain_logits) and torch.equal(boxes, plain_boxes)
    _, grid = dense.features(x)
    _, own_edges, own_centres = dense.regressor.per_cell(grid)  # the regressor's, unclipped and unscaled
    assert torch.equal(edges, own_edges) and torch.equal(centres, own_centres)
    with pytest.raises(VitkitError, match="dense box head only"):
        tiny_box_vit()(torch.randn(2, 3, 16, 16), cells=True)


def test_dense_head_is_translation_equivariant_and_finer_than_its_grid():
    """An object of features on an empty grid: its cells take (almost) all the weight, so moving the object by one
    cell moves the box by exactly one cell, and a box between cell centres can be expressed."""
    torch.manual_seed(0)
    dim = 4
    regressor = DenseBoxRegressor(dim=dim, hidden=dim, dropout=0.0).eval()
    first, last = regressor.mlp[0], regressor.mlp[3]
    with torch.no_grad():  # hidden = features (they are ≥ 0, so the ReLU passes them): out = last(features)
        first.weight.copy_(torch.eye(dim))
        first.bias.zero_()
        last.weight.normal_(std=0.3)
        last.weight[0] = torch.tensor([60.0, 0, 0, 0])  # weight logit: 60 on object cells, 0 elsewhere
        last.bias.copy_(torch.tensor([0.0, -2, -2, -2, -2]))  # short distances: the box stays inside the image
    grid = torch.zeros(1, 8, 8, dim)
    grid[0, 2:4, 1:4] = torch.rand(2, 3, dim)
    grid[0, 2:4, 1:4, 0] = 1.0  # the six object cells share the weight equally
    box = regressor(grid)
    moved = regressor(torch.roll(grid, shifts=(1, 2), dims=(1, 2)))  # the object stays inside the grid
    assert torch.allclose(moved - box, torch.tensor([[2 / 8, 1 / 8, 0, 0]]), atol=1e-6)
    assert torch.allclose(box, dense_reference(regressor, grid), atol=1e-6)  # inside the image: nothing clipped
    centre_x = box[0, 0] * 8 - 0.5  # in cell units: not on a cell centre
    assert abs(centre_x - centre_x.round()) > 1e-3


def test_region_pool_classifies_the_class_token_and_the_cells_averaged_by_the_box_weights():
    model = tiny_box_vit(box_head="dense", region_pool=True, dropout=0.0)
    x = torch.randn(3, 3, 16, 16)
    logits, boxes = model(x)
    pooled, grid = model.features(x)
    weight, _, _ = model.regressor.per_cell(grid)
    region = torch.zeros_like(pooled)
    for row in range(4):  # written out cell by cell, row-major as the weights are
        for col in range(4):
            region += weight[:, 4 * row + col, None] * grid[:, row, col]
    torch.testing.assert_close(logits, model.classifier(torch.cat([pooled, region], dim=1)))
    torch.testing.assert_close(boxes, model.regressor(grid))  # the box is the dense head's, as without pooling
    # The class loss trains the backbone and the classifier, not where the box head looks.
    model.train()
    torch.nn.functional.cross_entropy(model(x)[0], torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.regressor.parameters())
    assert model.backbone.pos_embed.grad.abs().sum() > 0 and model.classifier[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("box_head", ["mlp", "dense"])
def test_zoom_classifies_a_second_pass_over_the_square_around_the_box(box_head):
    model = tiny_box_vit(box_head=box_head, zoom=1.5, box_scale=0.9, dropout=0.0)
    plain = tiny_box_vit(box_head=box_head, box_scale=0.9, dropout=0.0)  # the same weights (seeded), no zoom
    x = torch.randn(3, 3, 16, 16)
    logits, boxes = model(x)
    torch.testing.assert_close(boxes, plain(x)[1])  # the box is the first pass's, scaled as without zoom
    plain.box_scale = 1.0
    crops = square_crops(x, plain(x)[1], 1.5, 16)  # around the box before the scale: training crops alike
    torch.testing.assert_close(logits, model.classifier(model.features(crops)[0]))
    # The class loss trains the backbone (both passes) and the classifier, not the box regressor.
    model.train()
    torch.nn.functional.cross_entropy(model(x)[0], torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.regressor.parameters())
    assert model.backbone.pos_embed.grad.abs().sum() > 0 and model.classifier[0].weight.grad.abs().sum() > 0


def test_a_zoom_backbone_of_its_own_reads_the_crops_and_the_first_pass_gives_the_box():
    model = tiny_box_vit(box_head="dense", zoom=1.5, dropout=0.0)
    x = torch.randn(3, 3, 16, 16)
    shared_logits, shared_boxes = model(x)
    own = copy.deepcopy(model)
    own.zoom_backbone = copy.deepcopy(model.backbone)
    # A copy of the first pass's backbone is the shared model, output for output.
    torch.testing.assert_close(own(x), (shared_logits, shared_boxes))
    with torch.no_grad():
        own.zoom_backbone.pos_embed.add_(torch.randn_like(own.zoom_backbone.pos_embed))
    logits, boxes = own(x)
    torch.testing.assert_close(boxes, shared_boxes)  # its weights move the class only
    crops = square_crops(x, boxes, 1.5, 16)
    torch.testing.assert_close(logits, own.classifier(own.features(crops, own.zoom_backbone)[0]))
    assert not torch.allclose(logits, shared_logits)
    # The class loss trains the zoom's backbone and the classifier; the box's backbone and head get nothing.
    own.train()
    torch.nn.functional.cross_entropy(own(x)[0], torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None or not p.grad.any()
               for p in (*own.backbone.parameters(), *own.regressor.parameters()))
    assert own.zoom_backbone.pos_embed.grad.abs().sum() > 0
    with pytest.raises(VitkitError, match="a backbone of the zoom's own runs the second pass, which needs --zoom"):
        tiny_box_vit(zoom_backbone=copy.deepcopy(model.backbone))


def test_zoom_crops_around_the_box_clipped_to_the_image_in_training_as_in_evaluation():
    model = tiny_box_vit(zoom=1.2, dropout=0.0)  # mlp head: its box may leave the image; the model does not clip it
    last = model.regressor[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():  # every image's box: (cx, cy, w, h) = (0.9, 0.1, 0.6, 0.6), through the sigmoid
        last.bias.copy_(torch.logit(torch.tensor([0.9, 0.1, 0.6, 0.6])))
    x = torch.randn(2, 3, 16, 16)
    # Its edges x 0.6..1.2 and y -0.2..0.4, clipped: x 0.6..1.0, y 0..0.4, i.e. centre (0.8, 0.2), sides 0.4.
    crops = square_crops(x, torch.tensor([[0.8, 0.2, 0.4, 0.4]]).expand(2, 4), 1.2, 16)
    expected = model.classifier(model.features(crops)[0])
    for training in (True, False):
        logits, boxes = model.train(training)(x)
        torch.testing.assert_close(boxes, torch.tensor([[0.9, 0.1, 0.6, 0.6]]).expand(2, 4))
        torch.testing.assert_close(logits, expected)


def test_a_larger_input_is_resized_for_the_first_pass_and_the_zoom_crops_it_at_full_detail():
    model = tiny_box_vit(box_head="dense", zoom=1.2, view_size=16, dropout=0.0)
    plain = tiny_box_vit(box_head="dense", zoom=1.2, dropout=0.0)  # the same weights, fed 16-pixel images
    big = torch.randn(2, 3, 32, 32)
    small = torch.nn.functional.interpolate(big, size=(16, 16), mode="bilinear", antialias=True)
    logits, boxes = model(big)
    _, expected_boxes = plain(small)
    torch.testing.assert_close(boxes, expected_boxes)  # the first pass sees the image at the backbone's size
    crops = square_crops(big, boxes, 1.2, 16)  # cut from the 32-pixel images
    torch.testing.assert_close(logits, model.classifier(model.features(crops)[0]))
    assert not torch.allclose(logits, plain(small)[0])  # ... which is not the crop of the 16-pixel image
    torch.testing.assert_close(model(small)[1], expected_boxes)  # an input at the view size passes unchanged


@pytest.mark.parametrize("backbone,box_head,region_pool,zoom,own", [
    ("vit", "mlp", False, 0.0, False), ("vit", "dense", False, 1.2, False), ("vit", "dense", True, 0.0, False),
    ("vit", "dense", False, 1.2, True), ("resnet18", "mlp", False, 0.0, False), ("resnet18", "dense", True, 0.0, False),
    ("resnet18", "mlp", False, 1.2, False), ("resnet18", "mlp", False, 1.2, True),
])
def test_spec_rebuilds_the_same_architecture(backbone, box_head, region_pool, zoom, own):
    if backbone == "vit":
        model = tiny_box_vit(dropout=0.1, box_head=box_head, box_scale=0.95, flip_tta=True, region_pool=region_pool,
                             zoom=zoom, view_size=16 if zoom else None)
    else:
        model = BoxModel(resnet18_backbone(cifar_stem=True), RESNET18_FEATURES, num_classes=3, hidden=16,
                         box_head=box_head, region_pool=region_pool, zoom=zoom)
    if own:
        model.zoom_backbone = copy.deepcopy(model.backbone)
        assert model.spec()["zoom_backbone"] == "own"
        assert any(k.startswith("zoom_backbone.") for k in BoxModel.from_spec(model.spec()).state_dict())
    rebuilt = BoxModel.from_spec(model.spec())
    own, other = model.state_dict(), rebuilt.state_dict()
    assert own.keys() == other.keys() and all(own[k].shape == other[k].shape for k in own)
    assert rebuilt.spec() == model.spec()
    if backbone == "resnet18" and box_head == "mlp" and not zoom:
        # Checkpoints from before the dense head, the scale, the flip, the pool and the zoom.
        old = {k: v for k, v in model.spec().items()
               if k not in ("box_head", "box_scale", "flip_tta", "region_pool", "zoom", "view_size", "zoom_backbone")}
        assert BoxModel.from_spec(old).spec() == model.spec()
    size, classes = (16, 5) if backbone == "vit" else (32, 3)
    logits, boxes = model.eval()(torch.randn(2, 3, size, size))
    assert logits.shape == (2, classes) and boxes.shape == (2, 4)


def test_resnet18_backbone_loads_a_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = resnet18(num_classes=1000)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet18.pth")  # torchvision's released files have no batch-norm counters
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "resnet18.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    expected = reference.eval()(x)
    for name in ("resnet18.pth", "resnet18.safetensors"):
        net = resnet18_backbone(tmp_path / name).eval()
        assert torch.allclose(net(x), expected, atol=1e-5) and expected.shape == (2, RESNET18_FEATURES)
    with pytest.raises(VitkitError, match="not a local file"):
        resnet18_backbone(tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(VitkitError, match="do not fit"):
        resnet18_backbone(tmp_path / "wrong.pth")


@requires_weights
def test_pretrained_vit_backbone_at_a_small_size_with_frozen_blocks():
    vit = vit_backbone(pretrained=WEIGHTS, image_size=32, freeze=6)
    assert vit.cfg.image_size == 32 and vit.cfg.dim == 192 and vit.cfg.num_classes == 0
    assert not vit.cls_token.requires_grad and not vit.pos_embed.requires_grad
    assert all(not p.requires_grad for b in vit.blocks[:6] for p in b.parameters())
    assert all(p.requires_grad for b in vit.blocks[6:] for p in b.parameters())
    model = BoxModel(vit, 192, num_classes=26)
    logits, boxes = model.eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 26) and boxes.shape == (1, 4)


def test_bad_head_settings_are_user_errors():
    with pytest.raises(VitkitError, match="dropout"):
        tiny_box_vit(dropout=1.0)
    with pytest.raises(VitkitError, match="unknown box head"):
        tiny_box_vit(box_head="fcos")
    with pytest.raises(VitkitError, match="drop --no-sigmoid"):
        tiny_box_vit(box_head="dense", sigmoid=False)
    with pytest.raises(VitkitError, match="--region-pool pools the features where the dense box head looks"):
        tiny_box_vit(region_pool=True)
    with pytest.raises(VitkitError, match="not a positive factor"):
        tiny_box_vit(box_scale=0.0)
    with pytest.raises(VitkitError, match="zoom margin 0.5 would crop the object"):
        tiny_box_vit(zoom=0.5)
    with pytest.raises(VitkitError, match="--zoom classifies a crop around the box, --region-pool"):
        tiny_box_vit(box_head="dense", region_pool=True, zoom=1.2)
    with pytest.raises(VitkitError, match="--zoom crops around the predicted box.*drop --no-sigmoid"):
        tiny_box_vit(sigmoid=False, zoom=1.2)
