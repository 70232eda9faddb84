"""One small model of every torchvision classification family, for the family tests.

Each factory takes ``num_classes`` and returns torchvision's own model classes and blocks, at
the smallest size torchvision ships or, where even that is heavy for a CI run on two cores, with
fewer blocks / channels (marked "reduced"). ``FULL`` names torchvision's smallest shipped model
of each family (``MPQKIT_TEST_FULL_FAMILIES=1`` runs those instead). Importable by path
(``tiny_families:resnext``) once this folder is on ``sys.path``, so that a search, which builds
its model by name, can use them too.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig
from torchvision.models.resnet import Bottleneck, ResNet

from mpqkit.models import build_model


def resnet(num_classes: int = 10) -> nn.Module:
    return build_model("resnet18", num_classes)


def resnext(num_classes: int = 10) -> nn.Module:  # reduced: 1 bottleneck per stage
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=num_classes)


def wide_resnet(num_classes: int = 10) -> nn.Module:  # reduced: 1 bottleneck per stage
    return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=num_classes)


def mobilenet_v2(num_classes: int = 10) -> nn.Module:
    return build_model("mobilenet_v2", num_classes, width_mult=0.25)


def mobilenet_v3(num_classes: int = 10) -> nn.Module:
    return build_model("mobilenet_v3_small", num_classes)


def shufflenet_v2(num_classes: int = 10) -> nn.Module:
    return build_model("shufflenet_v2_x0_5", num_classes)


def efficientnet(num_classes: int = 10) -> nn.Module:  # reduced: MBConv stages of B0's kind
    setting = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 2),
               MBConvConfig(6, 5, 2, 24, 40, 1)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=num_classes,
                        last_channel=128)


def efficientnet_v2(num_classes: int = 10) -> nn.Module:  # reduced: Fused-MBConv then MBConv
    setting = [FusedMBConvConfig(1, 3, 1, 16, 16, 1), FusedMBConvConfig(4, 3, 2, 16, 24, 2),
               MBConvConfig(4, 3, 2, 24, 32, 1)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=num_classes,
                        last_channel=128)


def regnet(num_classes: int = 10) -> nn.Module:
    return build_model("regnet_y_400mf", num_classes)


def mnasnet(num_classes: int = 10) -> nn.Module:
    return build_model("mnasnet0_5", num_classes)


def squeezenet(num_classes: int = 10) -> nn.Module:
    return build_model("squeezenet1_1", num_classes)


def densenet(num_classes: int = 10) -> nn.Module:  # reduced: growth 8, 2 layers per block
    return tvm.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                        num_classes=num_classes)


def googlenet(num_classes: int = 10) -> nn.Module:
    return build_model("googlenet", num_classes)


def convnext(num_classes: int = 10) -> nn.Module:  # reduced: 2 stages of 1 block, 32/64 channels
    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                    stochastic_depth_prob=0.1, num_classes=num_classes)


# family -> (factory here, torchvision's smallest shipped model, input size for that model)
FAMILIES: dict[str, tuple[str, str, int]] = {
    "ResNet": ("resnet", "resnet18", 32),
    "ResNeXt": ("resnext", "resnext50_32x4d", 32),
    "Wide-ResNet": ("wide_resnet", "wide_resnet50_2", 32),
    "MobileNet-V2": ("mobilenet_v2", "mobilenet_v2", 32),
    "MobileNet-V3": ("mobilenet_v3", "mobilenet_v3_small", 32),
    "ShuffleNet-V2": ("shufflenet_v2", "shufflenet_v2_x0_5", 32),
    "EfficientNet": ("efficientnet", "efficientnet_b0", 32),
    "EfficientNet-V2": ("efficientnet_v2", "efficientnet_v2_s", 32),
    "RegNet": ("regnet", "regnet_y_400mf", 32),
    "MNASNet": ("mnasnet", "mnasnet0_5", 32),
    "SqueezeNet": ("squeezenet", "squeezenet1_1", 32),
    "DenseNet": ("densenet", "densenet121", 32),
    "GoogLeNet": ("googlenet", "googlenet", 32),
    "ConvNeXt": ("convnext", "convnext_tiny", 32),
}
# only in the full run: too heavy for CI at any size (VGG's and AlexNet's classifiers hold
# 120M / 55M parameters whatever the input), or a minimum input of 75 px
FULL_ONLY: dict[str, tuple[str, int]] = {
    "Inception-V3": ("inception_v3", 75),
    "VGG": ("vgg11", 32),
    "AlexNet": ("alexnet", 64),
}
