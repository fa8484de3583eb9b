"""Model registry: ``build_model(name, num_classes, input_shape)`` for every model the trainer knows.

Three families, chosen by the input shape they take: the CIFAR zoo (RepDistiller names and state-dict keys,
3x32x32), small CNNs for 28x28 grey-scale images, and torchvision ImageNet models (``tv_<name>``, optional).
The language models of task lm (gpt.py, hf.py) are built by tasks.LanguageModelTask.
"""
from ..errors import ConfigError
from . import imagenet, mobilenetv2, resnet, resnetv2, shufflenet, small_cnn, vgg, wrn

CIFAR_MODELS = {**resnet.MODELS, **wrn.MODELS, **vgg.MODELS, **mobilenetv2.MODELS, **shufflenet.MODELS,
                **resnetv2.MODELS}
SMALL_MODELS = small_cnn.MODELS
# RepDistiller trains these students with lr 0.01 instead of 0.05.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def model_names():
    return sorted(CIFAR_MODELS) + sorted(SMALL_MODELS) + [f"{imagenet.PREFIX}<torchvision name>"]


def build_model(name, num_classes, input_shape):
    """A freshly initialised model ``name`` for inputs of shape (C, H, W) and ``num_classes`` outputs."""
    channels, height, width = input_shape
    if name in CIFAR_MODELS:
        if (channels, height, width) != (3, 32, 32):
            raise ConfigError(f"model {name!r} is a CIFAR model for 3x32x32 inputs, but the dataset gives "
                             f"{channels}x{height}x{width}; pick one of {sorted(SMALL_MODELS)} for 28x28 images")
        return CIFAR_MODELS[name](num_classes=num_classes)
    if name in SMALL_MODELS:
        if (height, width) != (28, 28):
            raise ConfigError(f"model {name!r} is for 28x28 images, but the dataset gives {height}x{width}")
        return SMALL_MODELS[name](num_classes=num_classes, in_channels=channels)
    if name.startswith(imagenet.PREFIX):
        return imagenet.build(name, num_classes)
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(model_names())}")
