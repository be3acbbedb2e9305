"""The model's forward pass: logits and features, compiled or not, and their post-processing."""

from __future__ import annotations

from typing import Any, Sequence

from dinobatch.schema import Col


def forward_with_features(module, x):
    """Logits and the penultimate (pooled) features of a torchvision ResNet in one pass."""
    import torch

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


def postprocess(logits, features, labels: Sequence[str], temperature: float,
                 embeddings: bool) -> list[dict[str, Any] | str]:
    """Probabilities (temperature-scaled softmax), margin and entropy per row; a reason where not finite."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=1).cpu()  # one device-to-host copy per batch
    feats = features.float().cpu() if embeddings else None
    top_p, top_i = probs.topk(min(2, probs.shape[1]), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    finite = torch.isfinite(probs).all(dim=1).tolist()
    out: list[dict[str, Any] | str] = []
    for row, (p, i, ok) in enumerate(zip(top_p.tolist(), top_i.tolist(), finite)):
        if not ok:
            out.append("the model produced non-finite outputs (NaN or infinity) for this image")
            continue
        out.append({Col.LABEL: labels[i[0]], Col.CONFIDENCE: p[0], Col.PROBS: probs[row].tolist(),
                    Col.MARGIN: p[0] - p[1] if len(p) > 1 else p[0], Col.ENTROPY: float(entropy[row]),
                    Col.EMBEDDING: feats[row].tolist() if feats is not None else None})
    return out
