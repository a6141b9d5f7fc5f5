"""Video Inception Score: IS = exp(E_x KL(p(y|x) ‖ p(y))) with C3D on UCF-101, mean ± std over splits.

Per split s the score needs only Σ_x p(y|x) [C], Σ_x Σ_y p log p and the count, because
E KL = E[Σ_y p log p] − Σ_y p̄ log p̄ with p̄ the split's mean prediction. Those sums reduce across ranks
by addition, so no per-sample probabilities are gathered (no cat-reduction).

Split assignment is round-robin over the *global* sample index g (split = g mod splits), with
g = k · world_size + rank for a rank's k-th sample — exactly the index DistributedSampler gives it. Data
sharded that way therefore score identically on any number of ranks. (The TGAN/StyleGAN-V code shuffles
and cuts contiguous splits instead: a different, equally random partition, so values agree in
expectation.) The std over splits is the population std (np.std), as in those references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from videolavit.metrics.c3d import SPORTS1M_MEAN_BGR, C3DClassifier, Pool5Mode, load_c3d, load_mean_clip
from videolavit.metrics.weights import FrozenNetwork


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class VideoInceptionScore(Metric):
    """Inception Score of generated videos; ``compute()`` returns (mean, std) over splits; higher is better.

    ``update(videos)`` takes videos [B, T, 3, H, W], RGB float in [-1, 1]; the classifier sees their
    central 16 frames (see :class:`~videolavit.metrics.c3d.C3DClassifier`).

    Args:
        c3d_path: local C3D weights (UCF-101 state dict, or TorchScript such as StyleGAN-V's c3d_ucf101.pt).
        splits: number of splits (10 in the image-IS tradition; every split needs samples).
        pool5, mean_bgr, mean_clip_path: C3D variant and normalisation, see :mod:`videolavit.metrics.c3d`.
        classifier: instead of C3D, any module mapping an ``update`` input to class probabilities [B, C]
            (then ``num_classes`` is required).
        num_classes: class count; read from C3D state dicts, 101 for TorchScript unless given, required
            with ``classifier``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    probability_sum: Tensor
    negative_entropy_sum: Tensor
    count: Tensor

    def __init__(
        self,
        c3d_path: str | Path | None = None,
        splits: int = 10,
        pool5: Pool5Mode = "pad",
        mean_bgr: Sequence[float] = SPORTS1M_MEAN_BGR,
        mean_clip_path: str | Path | None = None,
        classifier: nn.Module | None = None,
        num_classes: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if splits < 1:
            raise ValueError(f"splits must be positive, got {splits}")
        if classifier is not None and c3d_path is not None:
            raise ValueError("give either `c3d_path` or `classifier`, not both")
        if classifier is None:
            network = load_c3d(c3d_path, argument="c3d_path", pool5=pool5)
            mean_clip = load_mean_clip(mean_clip_path) if mean_clip_path is not None else None
            classifier = C3DClassifier(network, mean_bgr=mean_bgr, mean_clip=mean_clip)
            if classifier.num_classes > 0:
                num_classes = classifier.num_classes
            elif num_classes is None:  # TorchScript: UCF-101 unless told otherwise
                num_classes = 101
        if num_classes is None or num_classes < 2:
            raise ValueError("num_classes (≥ 2) is required when the classifier does not define it")
        self.splits, self.num_classes = splits, int(num_classes)
        self.classifier = FrozenNetwork(classifier)
        self.add_state("probability_sum", torch.zeros(splits, num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("negative_entropy_sum", torch.zeros(splits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(splits, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, videos: Tensor) -> None:
        inputs = videos.to(self.classifier.device)
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            probabilities = self.classifier(inputs)
        probabilities = probabilities.detach().to(device=self.count.device, dtype=torch.float64)
        if probabilities.ndim != 2 or probabilities.shape[1] != self.num_classes:
            raise ValueError(f"classifier gave {tuple(probabilities.shape)}, expected [B, {self.num_classes}]")
        rank, world = _rank_and_world()
        local_index = self.count.sum() + torch.arange(probabilities.shape[0], device=self.count.device)
        split = (local_index * world + rank) % self.splits  # [B] split of each sample's global index
        self.probability_sum = self.probability_sum.index_add(0, split, probabilities)
        self.negative_entropy_sum = self.negative_entropy_sum.index_add(
            0, split, torch.special.xlogy(probabilities, probabilities).sum(dim=1)
        )
        self.count = self.count.index_add(0, split, torch.ones_like(split))

    def split_scores(self) -> Tensor:
        """IS of each split [splits] from the (already synced) sums."""
        if int(self.count.min()) < 1:
            raise ValueError(
                f"every one of the {self.splits} splits needs samples; got counts {self.count.tolist()}"
            )
        n = self.count.double()
        mean_probability = self.probability_sum / n[:, None]  # p̄ per split [S, C]
        expected_kl = self.negative_entropy_sum / n - torch.special.xlogy(
            mean_probability, mean_probability
        ).sum(dim=1)
        return expected_kl.exp()

    def compute(self) -> tuple[Tensor, Tensor]:
        scores = self.split_scores()
        return scores.mean(), scores.std(unbiased=False)
