"""The closed-form aggregators (mean, logmean, vote, weighted): rules on the local probabilities ``(B, N, K)`` that
return log-probabilities ``(B, K)``; nothing is trained, ``weighted`` is fitted on held-out probabilities. Registered
with the trained ones of :mod:`ddcnn.models.aggregators` (the table of all is there) when :mod:`ddcnn.models` is
imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .aggregators import MIN_PROBABILITY, Aggregator, register_aggregator


@register_aggregator("mean")
class MeanAggregator(Aggregator):
    """Average probability: ``log (1/N) sum_i p_i``; the prediction is its argmax."""

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        return probabilities.mean(1).clamp_min(MIN_PROBABILITY).log()


@register_aggregator("logmean")
class LogMeanAggregator(Aggregator):
    """Average log-probability ``(1/N) sum_i log p_i`` (the geometric mean), renormalised to log-probabilities.

    Probabilities are clamped at ``MIN_PROBABILITY`` first, so one local CNN certain that a class is impossible
    lowers that class by a bounded amount instead of vetoing it.
    """

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        return probabilities.clamp_min(MIN_PROBABILITY).log().mean(1).log_softmax(-1)


@register_aggregator("vote")
class VoteAggregator(Aggregator):
    """Majority voting of the local predictions ``argmax_k p_i[k]``.

    Tie rule: among the classes with the most votes, the one with the highest summed probability
    ``s[k] = sum_i p_i[k]`` wins (if that ties too, the lowest class index). The output is the log of the
    distribution ``q[k] = (votes[k] + s[k] / (N + 1)) / (N + N / (N + 1))``: since ``s[k] <= N < N + 1``, one
    vote more always outweighs any probability sum, so ``argmax q`` is exactly the rule above, and ``q > 0``.
    """

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        n = self.num_subdomains
        votes = F.one_hot(probabilities.argmax(-1), self.num_classes).sum(1).to(probabilities.dtype)
        score = votes + probabilities.sum(1) / (n + 1)
        return (score / (n + n / (n + 1))).clamp_min(MIN_PROBABILITY).log()


@register_aggregator("weighted")
class WeightedAggregator(Aggregator):
    """Average probability with each local CNN weighted by its skill on validation data.

    :meth:`fit` sets ``w_i = max(acc_i - 1/K, 0)``, local CNN ``i``'s validation accuracy above chance (a local
    CNN that sees only background gets no say), normalised to sum to 1; uniform when every local CNN is at
    chance. Output ``log sum_i w_i p_i``. No gradient training: the weights are a buffer.
    """

    fitted = True

    def __init__(self, num_subdomains: int, num_classes: int):
        super().__init__(num_subdomains, num_classes)
        self.register_buffer("weights", torch.full((num_subdomains,), 1.0 / num_subdomains))
        self.register_buffer("accuracies", torch.full((num_subdomains,), float("nan")))

    def fit(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        self.check_input(probabilities)
        labels = labels.to(probabilities.device)
        accuracies = (probabilities.argmax(-1) == labels[:, None]).float().mean(0)
        skill = (accuracies - 1.0 / self.num_classes).clamp_min(0.0)
        weights = skill / skill.sum() if skill.sum() > 0 else torch.full_like(skill, 1.0 / self.num_subdomains)
        self.accuracies.copy_(accuracies)
        self.weights.copy_(weights)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        mixed = torch.einsum("bnk,n->bk", probabilities, self.weights.to(probabilities.dtype))
        return mixed.clamp_min(MIN_PROBABILITY).log()
