"""Small CNNs for 28x28 grey-scale images (Fashion-MNIST): a teacher (0.82M parameters) and two students (0.11M and
0.027M, the demo's: 31x smaller than the teacher)."""
import torch.nn as nn


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-maxpool stages and a two-layer classifier head."""

    def __init__(self, widths, hidden, num_classes=10, in_channels=1, image_size=28):
        super().__init__()
        layers, channels = [], in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {
    "cnn_teacher": lambda num_classes=10, in_channels=1: SmallCNN((32, 64), 256, num_classes, in_channels),
    "cnn_student": lambda num_classes=10, in_channels=1: SmallCNN((16, 32), 64, num_classes, in_channels),
    "cnn_tiny": lambda num_classes=10, in_channels=1: SmallCNN((8, 16), 32, num_classes, in_channels),
}
