"""The model's forward pass: logits and features in one pass, compiled or not."""

from __future__ import annotations


def forward_with_features(module, x):
    """Logits and the penultimate (pooled) features of a torchvision ResNet in one pass."""
    import torch

    if getattr(module, "dinobatch_returns_features", False):  # an int8 graph (models.quantize) returns both
        return module(x)

    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
    features = torch.flatten(module.avgpool(x), 1)
    return module.fc(features), features


def compiled(module, batch_size: int):
    """torch.compile'd forward; every batch padded to batch_size so the graph compiles once."""
    import torch

    compiled = torch.compile(lambda x: forward_with_features(module, x), dynamic=False)

    def forward(x):
        n = x.shape[0]
        if n < batch_size:
            pad = x.new_zeros((batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        logits, features = compiled(x)
        return logits[:n], features[:n]

    return forward
