"""The model zoo: published parameter counts at 100 classes and RepDistiller's state-dict key names."""
import pytest
import torch

from train.errors import ConfigError
from train.models import build_model

CIFAR = (3, 32, 32)
# Parameter counts of RepDistiller's models at num_classes=100 (measured from its model files).
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180, "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
    "ResNet18": 11_220_132, "ResNet50": 23_705_252,
}
# A few keys of each family, as in RepDistiller checkpoints.
KEYS = {
    "resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.bias", "fc.bias"],
    "vgg8": ["block0.0.weight", "block0.1.running_mean", "block4.0.bias", "classifier.weight"],
    "MobileNetV2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.bias", "conv2.0.weight",
                    "classifier.0.weight"],
    "ShuffleV1": ["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer1.1.conv3.weight", "conv2.weight", "bn2.bias", "linear.weight"],
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    model = build_model(name, 100, CIFAR)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(KEYS))
def test_state_dict_keys_and_forward(name):
    model = build_model(name, 100, CIFAR).eval()
    assert set(KEYS[name]) <= set(model.state_dict())
    with torch.no_grad():
        assert model(torch.randn(2, *CIFAR)).shape == (2, 100)


def test_small_cnns():
    teacher, student = (build_model(n, 10, (1, 28, 28)) for n in ("cnn_teacher", "cnn_student"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(teacher) > 5 * count(student)
    assert student(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_model_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown model 'resnet21'"):
        build_model("resnet21", 100, CIFAR)
    with pytest.raises(ConfigError, match="'resnet20' is a CIFAR model for 3x32x32 inputs"):
        build_model("resnet20", 10, (1, 28, 28))
