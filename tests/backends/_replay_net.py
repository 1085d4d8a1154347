"""The small QAT network the replay tests train (test_triton_layer_plans.py, on the stand-in
driver and on the GPU): an input stub, three Conv+BN layers (ReLU / none with a bias and
depthwise / ReLU6 dilated) and a residual add_relu."""
import torch

import gpuquant.nn as gnn


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stub = gnn.QuantStub()
        self.c0 = gnn.ConvBnRelu2d(16, 24, 1)
        self.c1 = gnn.ConvBn2d(24, 24, 3, 1, 1, groups=24, bias=True)
        self.add = gnn.Elemwise("add_relu")
        self.c2 = gnn.ConvBnRelu62d(24, 8, 3, padding=2, dilation=2)

    def forward(self, x):
        a = self.c0(self.stub(x))
        return self.c2(self.add(a, self.c1(a)))
