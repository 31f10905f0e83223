"""The model zoo: GhostNet v1/v2/v3 (ghostnet.py), G-Ghost RegNet (g_ghost_regnet.py) and the
plain VGG-16 / ResNet-56 / ResNet-50 that ghostify() turns into Ghost-VGG / Ghost-ResNet (plain.py)."""

from .ghostnet import (
    GHOSTNET_STAGES, ConvBnAct, GhostBottleneck, GhostBottleneckV3, GhostModuleV3, GhostNet, SqueezeExcite,
    ghostnet, ghostnet_050, ghostnet_100, ghostnet_130, ghostnetv2, ghostnetv2_100, ghostnetv2_130, ghostnetv2_160,
    ghostnetv3, ghostnetv3_050, ghostnetv3_100, ghostnetv3_130, ghostnetv3_160, make_divisible,
)
from .g_ghost_regnet import (
    G_GHOST_REGNET_CONFIGS, GGhostRegNet, GGhostStage, Stage, g_ghost_regnetx, g_ghost_regnetx_016, g_ghost_regnetx_032,
    g_ghost_regnetx_040,
)
from .plain import resnet50, resnet56_cifar, vgg16_cifar
