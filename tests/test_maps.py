"""Anomaly maps (dn2.maps, DN2(maps=...)): where a defect is, in the original image's coordinates, for both
methods; model files; interactions with clean, n_centres and the image score; patch features per backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dn2
from dn2 import DN2
from dn2.backbones import load_backbone
from dn2.maps import PatchNet, SpadeMemory, grid_to_map, load_patch_nets, patch_batches
from dn2.maps.memory import PatchCoreMemory
from dn2.modelfile import ModelFileError, read_model, write_model
from dn2.runtime import export_cache_key, get_runner, openvino_available, openvino_pieces
from dn2.search import knn

H, W = 72, 120  # not square: maps must come back in the original's coordinates
DEFECT = (slice(24, 48), slice(70, 94))  # rows, columns of the pasted defect


def texture(seed: int, defect: bool = False) -> Image.Image:
    """A fabric-like texture (diagonal weave + noise); with ``defect`` a bright blob over DEFECT."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    weave = 0.5 + 0.25 * np.sin((x + y) * 0.9) + 0.25 * np.sin((x - y) * 0.9)
    grey = 80 + 100 * weave + rng.normal(0, 6, (H, W))
    rgb = np.stack([grey, grey * 0.9, grey * 0.7], axis=-1)
    if defect:
        rows, cols = DEFECT
        rgb[rows, cols] = [250, 40, 40]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def normals() -> list[Image.Image]:
    return [texture(i) for i in range(14)]


def fit(normals, method: str, **options) -> DN2:
    settings = dict(backbone="efficientnet_lite0", map_backbone="efficientnet_lite0", map_size=96, runtime="torch",
                    progress=False)
    return DN2(maps=method, **{**settings, **options}).fit(normals)


@pytest.fixture(scope="module", params=["spade", "patchcore"])
def fitted(request, normals) -> DN2:
    return fit(normals, request.param)


def test_a_pasted_defect_lights_up_where_it_is_in_the_original_image(fitted):
    normal_map, bad_map = fitted.anomaly_map([texture(100), texture(101, defect=True)])
    assert bad_map.shape == normal_map.shape == (H, W) and bad_map.dtype == np.float32
    y, x = np.unravel_index(bad_map.argmax(), bad_map.shape)
    rows, cols = DEFECT
    assert rows.start <= y < rows.stop and cols.start <= x < cols.stop
    inside = np.zeros((H, W), bool)
    inside[DEFECT] = True
    assert bad_map[inside].mean() > 2 * bad_map[~inside].mean()
    assert normal_map.max() < bad_map.max() and fitted.pixel_threshold_ < bad_map.max()
    normal_mask, bad_mask = fitted.predict_mask([texture(100), texture(101, defect=True)])
    np.testing.assert_array_equal(bad_mask, bad_map > fitted.pixel_threshold_)
    # the threshold flags about 1% of the pixels of training-like images, and the whole defect (in these
    # 96-px inputs the deepest stage sees the entire image, so the defect raises the whole map a little)
    assert normal_mask.mean() < 0.05 and bad_mask[inside].all()
    assert bad_map[:, :40].mean() < 0.5 * bad_map[inside].mean()  # falling off away from the defect
    scores = fitted.anomaly_score([texture(100), texture(101, defect=True)])
    assert scores[1] > scores[0]


def test_the_map_of_each_image_has_that_images_size(fitted):
    sizes = [(30, 200), (150, 40), (H, W)]
    images = [texture(7).resize((w, h)) for h, w in sizes]
    assert [m.shape for m in fitted.anomaly_map(images)] == sizes


def test_maps_and_thresholds_are_identical_after_save_and_load(fitted, tmp_path):
    loaded = dn2.load(fitted.save(tmp_path / "maps.dn2"), runtime="torch", progress=False)
    assert loaded.method_ == fitted.method_
    assert loaded.pixel_threshold_ == fitted.pixel_threshold_ and loaded.threshold_ == fitted.threshold_
    images = [texture(100), texture(101, defect=True)]
    for a, b in zip(fitted.anomaly_map(images), loaded.anomaly_map(images)):
        np.testing.assert_array_equal(a, b)


def test_without_maps_the_model_file_is_unchanged(normals, tmp_path):
    plain = DN2(backbone="efficientnet_lite0", runtime="torch", progress=False).fit(normals[:4])
    header, tensors = read_model(plain.save(tmp_path / "plain.dn2"))
    assert "maps" not in header and not any(name.startswith("maps/") for name in tensors)
    assert sorted(header["method"]) == ["backbone", "flip", "k", "normalize", "precision", "stages"]
    loaded = dn2.load(tmp_path / "plain.dn2")
    assert loaded.maps_ is None and loaded.method_.maps is None
    with pytest.raises(ValueError, match="fitted without maps"):
        loaded.anomaly_map([texture(0)])


def test_image_score_rules_and_their_thresholds(normals):
    images = [texture(100), texture(101, defect=True)]
    combined = fit(normals[:6], "spade", image_score="combined")
    results = list(combined.localize(images))
    maps = combined.maps_
    z = [(r.dn2_score - maps.dn2_stats[0]) / maps.dn2_stats[1] + (r.map_score - maps.map_stats[0]) / maps.map_stats[1]
         for r in results]
    np.testing.assert_allclose(combined.anomaly_score(images), z)
    assert combined.threshold_ == maps.image_threshold != combined.detector.threshold_
    assert combined.predict(images).tolist() == [1 if s <= combined.threshold_ else -1 for s in z]
    by_map = fit(normals[:6], "spade", image_score="map")
    np.testing.assert_allclose(by_map.anomaly_score(images), [r.map_score for r in results])
    default = fit(normals[:6], "spade")
    assert default.threshold_ == default.detector.threshold_  # image-level DN2, unchanged
    np.testing.assert_allclose(default.anomaly_score(images), [r.dn2_score for r in results])


def test_clean_drops_the_dropped_images_patches_too(normals):
    odd = texture(50, defect=True)
    model = fit(normals + [odd], "spade", clean=0.1)
    dropped = sorted(set(range(len(normals) + 1)) - set(model.detector.kept_.tolist()))
    assert len(normals) in dropped  # the odd image is dropped by the image-level scores ...
    assert model.maps_.n_images == len(model.detector.kept_)  # ... and the maps own only the kept images
    assert model.maps_.memory.owner.max() == len(model.detector.kept_) - 1
    bad = model.anomaly_map([texture(101, defect=True)])[0]
    assert bad[DEFECT].mean() > model.pixel_threshold_  # the defect was not learnt as normal


def test_spade_with_n_centres_is_an_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="n_centres"):
        DN2(maps="spade", n_centres=4).fit(tmp_path / "no such folder")


def test_patchcore_works_with_n_centres(normals):
    model = fit(normals, "patchcore", n_centres=4)
    assert len(model.detector.memory_) == 4 and model.maps_.n_images == len(normals)
    assert model.anomaly_map([texture(101, defect=True)])[0][DEFECT].mean() > model.pixel_threshold_


def test_settings_are_checked():
    with pytest.raises(ValueError, match="image_score='map' needs maps"):
        DN2(image_score="map").check_params()
    with pytest.raises(ValueError, match="novelty=False"):
        DN2(maps="spade", image_score="combined", novelty=False).check_params()
    with pytest.raises(ValueError, match="maps must be"):
        DN2(maps="heatmap").check_params()
    with pytest.raises(ValueError, match="map_coreset"):
        DN2(maps="spade", map_coreset=0.0).check_params()
    assert DN2(maps="spade").method().map_backbone == "efficientnet_lite2"  # the best preset's maps
    assert DN2(maps="spade", preset="paper").method().fitted("fp32").map_backbone == "efficientnet_lite0"


def test_a_damaged_maps_part_is_refused_naming_it(fitted, tmp_path):
    path = fitted.save(tmp_path / "m.dn2")
    header, tensors = read_model(path)
    owner = tensors["maps/owner"].copy()
    owner[0] = 10_000
    write_model(tmp_path / "bad_owner.dn2", header, {**tensors, "maps/owner": owner})
    with pytest.raises(ModelFileError, match="maps/owner"):
        dn2.load(tmp_path / "bad_owner.dn2")
    no_maps = {k: v for k, v in header.items() if k != "maps"}
    write_model(tmp_path / "no_maps.dn2", no_maps, tensors)
    with pytest.raises(ModelFileError, match="no maps part"):
        dn2.load(tmp_path / "no_maps.dn2")
    other = {**header, "maps": {**header["maps"], "nets": [{**header["maps"]["nets"][0], "weights_id": "sha256:other"}]}}
    write_model(tmp_path / "other_weights.dn2", other, tensors)
    with pytest.raises(ModelFileError, match="patch networks differ"):
        dn2.load(tmp_path / "other_weights.dn2")


def test_unreadable_training_image_is_skipped_by_both_passes(normals, tmp_path):
    for i, image in enumerate(normals[:6]):
        image.save(tmp_path / f"n{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="broken.png"):
        model = fit(tmp_path, "spade", skip_bad=True)
    assert len(model.skipped_) == 1 and model.maps_.n_images == 6


# -- the pieces ---------------------------------------------------------------------------------------


def test_patch_features_per_backbone_and_stage():
    lite0 = load_backbone("efficientnet_lite0", weights="random")
    net = PatchNet(lite0, stages=(-3, -2), size=64)
    assert (net.grid, net.dim, net.stages) == ((8, 8), 40 + 112, (2, 3))
    assert PatchNet(lite0, stages=(2, 3), size=64).identity() == net.identity()
    deep = PatchNet(lite0, stages=(-3, -2, -1), size=96)
    assert (deep.grid, deep.dim) == ((12, 12), 40 + 112 + 320)
    lite2 = load_patch_nets("efficientnet_lite2", "random", size=64)[0]
    assert lite2.dim == 48 + 120
    resnet = PatchNet(load_backbone("resnet50", weights="random"), size=64)  # layer2 + layer3, as PatchCore
    assert (resnet.grid, resnet.dim, resnet.stages) == ((8, 8), 512 + 1024, (1, 2))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert net(x).shape == (2, 8 * 8 * 152)
    with pytest.raises(ValueError, match="out of range"):
        PatchNet(lite0, stages=(7,), size=64)


def test_patch_features_are_the_stages_averaged_upsampled_and_concatenated():
    lite0 = load_backbone("efficientnet_lite0", weights="random")
    net = PatchNet(lite0, stages=(-3, -2), size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body = lite0.body
        h = body.bn1(body.conv_stem(x))
        outs = []
        for i, block in enumerate(body.blocks[:5]):
            h = block(h)
            if i in (2, 4):
                outs.append(torch.nn.functional.avg_pool2d(h, 3, stride=1, padding=1))
        outs[1] = torch.nn.functional.interpolate(outs[1], size=(8, 8), mode="bilinear", align_corners=False)
        expected = torch.cat(outs, 1)[0].permute(1, 2, 0)  # (h, w, D)
        np.testing.assert_allclose(net(x).reshape(8, 8, 152).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_patch_network_has_its_own_export_identity_and_bf16_pieces():
    lite0 = load_backbone("efficientnet_lite0", weights="random")
    net = PatchNet(lite0, size=64)
    assert export_cache_key(net) != export_cache_key(lite0) != export_cache_key(PatchNet(lite0, size=96))
    assert get_runner(net, "torch", "fp32") is not get_runner(lite0, "torch", "fp32")
    parts = [(name, precision) for name, _, precision in openvino_pieces(net, "bf16")]
    assert parts == [("early", "fp32"), ("rest", "bf16")]  # the image-level path's bf16 rule


@pytest.mark.parametrize("runtime, precision", [("onnx", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
                                                ("torch", "bf16")])
def test_patch_features_agree_on_every_runtime(runtime, precision):
    if runtime == "openvino" and not openvino_available():
        pytest.skip("openvino is not installed")
    nets = load_patch_nets("efficientnet_lite0", size=64)
    images = np.random.default_rng(0).integers(0, 255, (3, 50, 70, 3), dtype=np.uint8)
    reference = next(patch_batches(nets, images, runtime="torch", precision="fp32")).features
    features = next(patch_batches(nets, images, runtime=runtime, precision=precision)).features
    tolerance = 1e-4 if precision == "fp32" else 0.1  # bf16 keeps ~3 significant digits
    assert np.abs(features - reference).max() <= tolerance * np.abs(reference).max()


def test_grid_to_map_samples_pixel_centres_and_smooths():
    grid = np.array([[0.0, 0.0], [0.0, 4.0]], np.float32)
    m = grid_to_map(grid, (4, 6), sigma=0)
    assert m.shape == (4, 6) and m[0, 0] == 0.0 and m[-1, -1] == 4.0
    # pixel (1, 2) has its centre at grid coordinates (0.25, 1/3): bilinear weight 0.25 * 1/3 on the 4
    assert m[1, 2] == pytest.approx(4.0 * 0.25 / 3)
    np.testing.assert_allclose(grid_to_map(np.full((3, 3), 2.5, np.float32), (50, 30)), 2.5, rtol=1e-6)
    spike = np.zeros((9, 9), np.float32)
    spike[4, 4] = 1.0
    assert grid_to_map(spike, (90, 90)).max() < grid_to_map(spike, (90, 90), sigma=0).max()


def test_memories_against_brute_force():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(30, 6)).astype(np.float32) + i for i in range(4)]
    spade = SpadeMemory(1.0)
    for i, patches in enumerate(images):
        spade.add(i, patches)
    spade.finish()
    queries = rng.normal(size=(10, 6)).astype(np.float32) + 1.5
    expected = np.sqrt(((queries[:, None] - np.vstack([images[1], images[3]])[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(spade.distances(queries, np.array([1, 3])), expected, rtol=1e-5)
    core = PatchCoreMemory(1.0)
    for i, patches in enumerate(images):
        core.add(i, patches)
    core.finish()
    others = np.vstack(images[:2] + images[3:])
    expected = np.sqrt(((images[2][:, None] - others[None]) ** 2).sum(-1)).min(1)  # without image 2's own rows
    np.testing.assert_allclose(core.loo_distances(images[2], 2), expected, rtol=1e-5)
    np.testing.assert_allclose(core.distances(images[2]), 0.0, atol=1e-5)
    reduced = SpadeMemory(0.25)
    reduced.add(0, images[0])
    assert len(reduced.finish().patches) == 8 and knn(images[0], reduced.patches, 1)[0].max() == 0.0


def test_an_ensemble_of_map_backbones_is_concatenated_per_location(normals, tmp_path):
    model = fit(normals[:5], "spade", map_backbone="efficientnet_lite0+efficientnet_lite2", weights="random", map_size=64)
    maps = model.maps_
    assert [net.dim for net in maps.nets] == [152, 168] and maps.memory.patches.shape[1] == 320
    assert maps.scales.shape == (2,) and (maps.scales > 0).all()  # each part divided by its mean length
    loaded = dn2.load(model.save(tmp_path / "ensemble.dn2"), runtime="torch", progress=False)
    np.testing.assert_array_equal(loaded.maps_.scales, maps.scales)
    np.testing.assert_array_equal(loaded.anomaly_map([texture(3)])[0], model.anomaly_map([texture(3)])[0])


def test_an_image_too_large_to_decode_whole_gets_no_patches_but_the_rest_goes_on(normals, tmp_path):
    """The image-level pass decodes JPEGs reduced (draft); the maps need the original size, so decode it whole.
    An image over the memory budget at full size is then skipped by the maps alone (with skip_bad), and SPADE's
    neighbours are taken among the images that have patches."""
    from dn2.config import config_context

    for i, image in enumerate(normals[:6]):
        image.save(tmp_path / f"n{i}.png")
    normals[6].resize((1600, 960)).save(tmp_path / "zz_large.jpg", quality=90)
    with config_context(image_memory=4), pytest.warns(UserWarning, match="zz_large.jpg"):
        model = fit(tmp_path, "spade", skip_bad=True, num_workers=0)
    assert len(model.detector.memory_) == 7 and model.maps_.n_images == 7  # in the image-level memory ...
    assert model.maps_.has_patches.tolist() == [True] * 6 + [False]  # ... but without patches
    assert any("zz_large.jpg" in message for message in model.skipped_)
    neighbours = model.maps_.neighbours(model.detector.index_, model.detector.memory_[6:])
    assert 6 not in neighbours and neighbours.shape == (1, 6)  # K=10, but only 6 images own patches
    assert model.anomaly_map([texture(101, defect=True)])[0][DEFECT].mean() > model.pixel_threshold_


def test_patchcore_bank_searched_by_an_approximate_index_survives_save_and_load(normals, tmp_path):
    model = fit(normals[:6], "patchcore", index="ivf", index_params={"nprobe": 2}, map_size=64)
    assert model.maps_.memory.index.kind == "ivf"
    loaded = dn2.load(model.save(tmp_path / "ivf.dn2"), runtime="torch", progress=False)
    _, tensors = read_model(tmp_path / "ivf.dn2")
    assert {"maps/index/centres", "maps/index/order", "maps/index/offsets"} <= set(tensors)
    np.testing.assert_array_equal(loaded.anomaly_map([texture(3)])[0], model.anomaly_map([texture(3)])[0])


def test_an_unreadable_image_between_readable_ones_keeps_its_place(normals, tmp_path):
    model = fit(normals, "spade", image_score="combined", skip_bad=True)
    folder = tmp_path / "queries"
    folder.mkdir()
    texture(100).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not an image")
    texture(101, defect=True).save(folder / "c.png")
    with pytest.warns(UserWarning, match="b.png"):
        maps = model.anomaly_map(folder)
    assert [m is None for m in maps] == [False, True, False] and maps[2].shape == (H, W)
    with pytest.warns(UserWarning, match="b.png"):
        scores, verdicts = model.anomaly_score(folder), model.predict(folder)
    assert np.isnan(scores[1]) and scores[2] > scores[0] and verdicts[1] == 0
    with pytest.warns(UserWarning, match="b.png"):
        masks = model.predict_mask(folder)
    assert masks[1] is None and masks[2][DEFECT].mean() > masks[0][DEFECT].mean()
