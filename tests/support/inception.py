"""A stand-in for torch-fidelity's FID Inception weights (the real file is not downloaded in tests): its architecture
with random weights whose BatchNorm statistics are set from one batch of random images, so the 2048 features vary
with the input (with BatchNorm's default statistics they vanish through the depth, and every FID would be ~0)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def random_inception_file(path: Path, seed: int = 0) -> Path:
    """Write the stand-in state dict to `path` (torch.save of tensors only: read back with weights_only=True)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    torch.manual_seed(seed)
    with mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
            mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}):
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: one batch sets the statistics
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        net((torch.rand(8, 3, 32, 32) * 255).to(torch.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.eval().state_dict(), path)
    return path
