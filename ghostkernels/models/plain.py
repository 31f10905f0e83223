"""The plain CNNs of the GhostNet paper's compression experiments, for ghostify():

    vgg16_cifar()    VGG-16 on CIFAR-10 (the 15.0M-parameter variant: conv without bias, BN,
                     classifier 512-512(BN)-10; keys feature.* / classifier.*)
    resnet56_cifar() ResNet-56 on CIFAR-10 (16/32/64 channels, 9 BasicBlocks a stage, option A
                     shortcuts: strided slice and zero channel padding, no parameters; 0.85M)
    resnet50()       ResNet-50 on ImageNet (torchvision's structure and keys)

The paper's Ghost versions (s = ratio, d = dw_size = 3): Ghost-VGG-16 and Ghost-ResNet-56 replace
every conv; Ghost-ResNet-50 keeps the 7x7 stem dense and replaces the rest, the 1x1 downsample
convs included (the authors' ghost_resnet.py in huawei-noah/Efficient-AI-Backbones):

    ghost_vgg = ghostkernels.ghostify(vgg16_cifar(), ratio=2)                   # Ghost-VGG-16 (s=2)
    ghost_resnet56 = ghostkernels.ghostify(resnet56_cifar(), ratio=2)           # Ghost-ResNet-56 (s=2)
    ghost_resnet50 = ghostkernels.ghostify(resnet50(), ratio=4, keep="stem")    # Ghost-ResNet-50 (s=4)
"""

import torch.nn.functional as F
from torch import nn

VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG16CIFAR(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers, channels = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                        nn.Linear(512, num_classes))

    def forward(self, x):
        x = F.avg_pool2d(self.feature(x), 2)
        return self.classifier(x.flatten(1))


class BasicBlock(nn.Module):
    """CIFAR ResNet block: two 3x3 conv + BN, option-A shortcut, ReLU after the add."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad_channels = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def shortcut(self, x):
        if self.pad_channels is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, blocks_per_stage=9, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        channels = 16
        for index, planes in enumerate((16, 32, 64)):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(channels, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(blocks_per_stage - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            channels = planes
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Bottleneck(nn.Module):
    """ResNet-50 block (torchvision keys): 1x1, 3x3 (stride), 1x1 x4, each + BN, ReLU after the add."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            stride = 1 if index == 0 else 2
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def vgg16_cifar(num_classes=10):
    return VGG16CIFAR(num_classes)


def resnet56_cifar(num_classes=10):
    return ResNetCIFAR(9, num_classes)


def resnet50(num_classes=1000):
    return ResNet50(num_classes)
