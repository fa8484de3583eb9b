"""CIFAR VGGs with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19) as in RepDistiller's ``models/vgg.py``."""
import torch.nn as nn
import torch.nn.functional as F

CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths, in_channels):
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied in forward


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=100):
        super().__init__()
        self.block0 = _block(cfg[0], 3)
        self.block1 = _block(cfg[1], cfg[0][-1])
        self.block2 = _block(cfg[2], cfg[1][-1])
        self.block3 = _block(cfg[3], cfg[2][-1])
        self.block4 = _block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, (2.0 / n) ** 0.5)
                m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x):
        height = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if height == 64:
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(x.flatten(1))


MODELS = {name: (lambda cfg: lambda num_classes=100: VGG(cfg, num_classes))(cfg) for name, cfg in CFGS.items()}
