"""PyTorch reference networks for the metric tests, rebuilt from plain torch.nn (random weights; the tests
save their state dicts in the formats users supply). Not a test module: test_metrics and test_evaluate use
them, conftest's lpips_pair fixture builds on TorchLPIPS."""

import torch
import torch.nn.functional as F
from torch import nn


class TorchLPIPS(nn.Module):
    """lpips.LPIPS(net='alex', version='0.1', spatial=False) rebuilt from plain torch.nn. The lpips package
    imports torchvision, whose PyPI wheel is a CUDA build that cannot load next to the CPU torch (and, once
    installed, breaks the diffusers and transformers imports), so the package stays out of the test extra."""

    TAPS = (1, 4, 7, 9, 11)  # the ReLUs ending lpips' slice1..slice5 of torchvision's `features`

    def __init__(self):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2)
        self.features = nn.Sequential(  # torchvision's AlexNet `features`, same indices
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), pool(), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), pool(),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 192, 384, 256, 256))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def relus(self, x):
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, x0, x1):
        unit = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)  # normalize_tensor
        total = 0
        for f0, f1, lin in zip(self.relus(x0), self.relus(x1), self.lins):
            total = total + lin((unit(f0) - unit(f1)) ** 2).mean([2, 3], keepdim=True)
        return total


def _same_pads(sizes, kernel, stride):
    """pytorch_i3d's compute_pad, in F.pad's last-axis-first order."""
    pads = []
    for n, k, s in zip(sizes, kernel, stride):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads = [total // 2, total - total // 2] + pads
    return pads


class TorchUnit3D(nn.Module):
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, bias=False, relu=True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=1.0) if bn else None  # momentum 1: see calibrate

    def forward(self, x):
        x = self.conv3d(F.pad(x, _same_pads(x.shape[2:], self.kernel, self.stride)))
        x = self.bn(x) if self.bn is not None else x
        return F.relu(x) if self.relu else x


class TorchSamePool(nn.MaxPool3d):
    def forward(self, x):
        return super().forward(F.pad(x, _same_pads(x.shape[2:], self.kernel_size, self.stride)))


class TorchInception(nn.Module):
    def __init__(self, cin, out):
        super().__init__()
        self.b0 = TorchUnit3D(cin, out[0])
        self.b1a, self.b1b = TorchUnit3D(cin, out[1]), TorchUnit3D(out[1], out[2], (3, 3, 3))
        self.b2a, self.b2b = TorchUnit3D(cin, out[3]), TorchUnit3D(out[3], out[4], (3, 3, 3))
        self.b3a, self.b3b = TorchSamePool((3, 3, 3), (1, 1, 1)), TorchUnit3D(cin, out[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class TorchI3D(nn.Module):
    """pytorch_i3d's InceptionI3d (RGB, 400 classes), written from the architecture description."""

    def __init__(self):
        super().__init__()
        self.order = []
        for name, module in [
            ("Conv3d_1a_7x7", TorchUnit3D(3, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", TorchSamePool((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", TorchUnit3D(64, 64)),
            ("Conv3d_2c_3x3", TorchUnit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", TorchSamePool((1, 3, 3), (1, 2, 2))),
            ("Mixed_3b", TorchInception(192, (64, 96, 128, 16, 32, 32))),
            ("Mixed_3c", TorchInception(256, (128, 128, 192, 32, 96, 64))),
            ("MaxPool3d_4a_3x3", TorchSamePool((3, 3, 3), (2, 2, 2))),
            ("Mixed_4b", TorchInception(128 + 192 + 96 + 64, (192, 96, 208, 16, 48, 64))),
            ("Mixed_4c", TorchInception(192 + 208 + 48 + 64, (160, 112, 224, 24, 64, 64))),
            ("Mixed_4d", TorchInception(160 + 224 + 64 + 64, (128, 128, 256, 24, 64, 64))),
            ("Mixed_4e", TorchInception(128 + 256 + 64 + 64, (112, 144, 288, 32, 64, 64))),
            ("Mixed_4f", TorchInception(112 + 288 + 64 + 64, (256, 160, 320, 32, 128, 128))),
            ("MaxPool3d_5a_2x2", TorchSamePool((2, 2, 2), (2, 2, 2))),
            ("Mixed_5b", TorchInception(256 + 320 + 128 + 128, (256, 160, 320, 32, 128, 128))),
            ("Mixed_5c", TorchInception(256 + 320 + 128 + 128, (384, 192, 384, 48, 128, 128))),
        ]:
            self.add_module(name, module)
            self.order.append(name)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.logits = TorchUnit3D(1024, 400, bn=False, bias=True, relu=False)

    def forward(self, x):
        """-> (400 logits, 1024 pooled features), with the single pooled position squeezed."""
        for name in self.order:
            x = getattr(self, name)(x)
        pooled = self.avg_pool(x)
        return self.logits(pooled).flatten(1), pooled.flatten(1)
