"""DivPrune: keep the most mutually distant visual tokens (a Max-Min Diversity Problem solved greedily), before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from crop.config import ConfigMixin, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, PreLLMMethod

FIRSTS = ("isolated", "index")
# rows of the (rows, n) distance block computed at once when looking for the most isolated token: bounds the
# memory of that step to ~16 MiB (fp32) whatever the image's token count (Qwen2-VL images reach ~16k tokens)
_BLOCK_ENTRIES = 1 << 22


@dataclass
class DivPruneConfig(ConfigMixin):
    """Config of DivPrune (defaults: the paper's rule, as crop reads it; see :class:`DivPrune`).

    Args:
        keep_tokens: visual tokens per image that reach the LLM (the paper's ``M~``, the size of
            the selected subset); ``None`` keeps every token.
        first: how the greedy solver picks its first token, the one step crop could not pin down
            from the paper's text alone. ``"isolated"`` (default): the token whose nearest other token is farthest, i.e.
            ``argmax_i min_{j != i} d(x_i, x_j)``, the max-min objective applied to the whole set
            with the pairwise ``i != j`` of the MMDP's definition. ``"index"``: the image's first
            visual token, what the same formula gives when a token's zero distance to itself is
            not excluded (every minimum is then 0 and the first maximum is token 0).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    first: str = "isolated"
    method_name: ClassVar[str] = "divprune"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        if self.first not in FIRSTS:
            raise ValueError(f"unknown first {self.first!r}; choose one of {', '.join(FIRSTS)}")


def _most_isolated(unit: torch.Tensor) -> torch.Tensor:
    """``()`` index of the token whose nearest other token is farthest (cosine distance; first maximum on ties).

    Args:
        unit: ``(n, D)`` L2-normalised tokens (fp32), ``n >= 2``.

    The ``(n, n)`` distances are computed in row blocks, so memory stays bounded on large images.
    """
    n = unit.shape[0]
    rows = max(1, _BLOCK_ENTRIES // n)
    nearest = torch.empty(n, device=unit.device)  # (n,) distance of each token to its nearest other token
    for start in range(0, n, rows):
        block = 1 - unit[start:start + rows] @ unit.T  # (r, n) cosine distances
        r = block.shape[0]
        block[torch.arange(r, device=unit.device), torch.arange(start, start + r, device=unit.device)] = torch.inf
        nearest[start:start + r] = block.min(dim=1).values
    return nearest.argmax()


def max_min_diverse(tokens: torch.Tensor, k: int, first: str = "isolated") -> torch.Tensor:
    """The greedy Max-Min Diversity solution: ``k`` tokens, each as far (cosine) from those chosen before as possible.

    After the first token (``first``, see :class:`DivPruneConfig`), every step adds the token not
    yet chosen whose minimum cosine distance ``1 - cos(x_i, x_j)`` to the chosen set is largest
    (first maximum on ties, i.e. the lower index). Runs on the tokens' device without reading
    anything back to the host: ``k`` steps of one matrix-vector product each.

    Args:
        tokens: ``(n, D)`` the candidates (any float dtype; computed in fp32).
        k: how many to choose (``>= n`` chooses all).
        first: ``"isolated"`` or ``"index"``.

    Returns:
        ``(min(k, n),)`` sorted indices into ``tokens``.

    Raises:
        ValueError: on an unknown ``first`` or ``k < 1``.
    """
    if first not in FIRSTS:
        raise ValueError(f"unknown first {first!r}; choose one of {', '.join(FIRSTS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, device = tokens.shape[0], tokens.device
    if k >= n:
        return torch.arange(n, device=device)
    unit = F.normalize(tokens.float(), dim=-1)  # (n, D)
    pick = _most_isolated(unit) if first == "isolated" else torch.zeros((), dtype=torch.long, device=device)
    chosen = torch.empty(k, dtype=torch.long, device=device)  # (k,) in the order they were chosen
    taken = torch.zeros(n, dtype=torch.bool, device=device)  # (n,)
    nearest = torch.full((n,), torch.inf, device=device)  # (n,) min distance of each token to the chosen set
    for step in range(k):
        chosen[step] = pick
        taken[pick] = True
        nearest = torch.minimum(nearest, 1 - unit @ unit[pick])  # (n,)
        if step + 1 < k:
            pick = nearest.masked_fill(taken, -torch.inf).argmax()  # ()
    return chosen.sort().values


@METHODS.register("divprune")
class DivPrune(PreLLMMethod):
    """DivPrune: keep the subset of visual tokens whose minimum pairwise cosine distance is largest.

    Paper: Ranjbar Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning
    for Large Multimodal Models" (CVPR 2025, arXiv 2503.02175). Stage: before the LLM,
    training-free, question-independent. **Re-derived from the paper's text only**: the official
    code is under a non-commercial licence and was not read. Only the abstract and third-party
    summaries of the paper could be read here (no download); they confirm the MMDP, the cosine
    distance and the greedy "add the token farthest from the chosen set" step. The section and
    algorithm numbers below and the choice of the first token are unverified against the PDF.

    The rule (paper, Sec. 3): pruning is posed as a Max-Min Diversity Problem (MMDP) over the
    image's ``M`` visual tokens as the LLM would receive them (after the projector): choose the
    subset ``S`` of ``M~`` tokens that maximises ``min_{i != j in S} d(x_i, x_j)``, with the cosine
    distance ``d(x_i, x_j) = 1 - x_i . x_j / (|x_i| |x_j|)``; the tokens outside ``S`` are dropped
    and the rest go on to the LLM. The MMDP is NP-hard, so the paper solves it greedily
    (Algorithm 1): start from one token, then repeatedly add the remaining token whose minimum
    distance to the tokens already chosen is largest, until ``M~`` are chosen
    (:func:`max_min_diverse`, ``k`` matrix-vector products, no host round trip).

    Choices the paper leaves open (or that crop could not settle from its text), and what crop does:

    1. The first token (``first``): ``"isolated"``, the token whose nearest neighbour is farthest
       (the max-min objective with the ``i != j`` of the MMDP's definition); ``"index"``, the first
       visual token (the same formula read with the zero self-distance included).
    2. The budget: the paper states a pruning ratio; crop counts ``keep_tokens = M~`` visual
       tokens per image reaching the LLM (``M~ = (1 - ratio) * M`` for the paper's ratios), the
       meaning every pre-LLM method here has, so the default :meth:`planned_counts` (``keep_tokens``
       at every layer) feeds matched compute.
    3. Order and positions: the kept tokens keep their image order and enter the LLM at
       consecutive positions (LLaVA), or at their own cells' M-RoPE positions (Qwen2-VL/2.5-VL/3-VL).
    4. Ties: the lower index wins (``argmax``'s first maximum). Precision: distances in fp32 on
       L2-normalised tokens (``F.normalize``, eps 1e-12), whatever the model's dtype.
    5. Multi-grid images (LLaVA-NeXT): one MMDP over all of an image's visual tokens (base view
       and high-resolution tiles together; the newline tokens are structure, kept iff their row
       keeps a token). Qwen2-VL/2.5-VL/3-VL: the MMDP runs on the merged tokens the LLM receives;
       on Qwen3-VL a kept token carries its own DeepStack features (:meth:`CompressedImage.carry`).
       The paper evaluates LLaVA-style models; these are applications of the same rule.
    6. A budget at or above an image's visual tokens (or ``None``) keeps the stock inputs.

    Config: :class:`DivPruneConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`DivPruneConfig`.
    """

    name = "divprune"
    config_class = DivPruneConfig
    config: DivPruneConfig

    def keeps_everything(self, spans):
        budget = self.config.keep_tokens
        return budget is None or all(budget >= s.visual_tokens for s in spans)

    def selection_flops(self, seq_len, n_in):
        """Normalising the ``n_in`` tokens, the all-pairs distances (``first="isolated"``), and per chosen token one
        distance column, a minimum and an argmax."""
        keep = self.config.keep_tokens
        if keep is None or keep >= n_in:
            return 0
        width = int(self.adapter.text_config.hidden_size)  # the tokens are projected to the LM's width
        pairs = (2 * width + 2) * n_in * n_in if self.config.first == "isolated" else 0
        return 3 * n_in * width + pairs + keep * (2 * width + 4) * n_in

    def compress_image(self, features, span, box, image_index):
        budget = self.config.keep_tokens
        if budget is None or budget >= span.visual_tokens:
            return keep_all(span, features)
        visual = span.visual_positions().to(features.device)  # (V,) span positions, increasing
        keep = visual[max_min_diverse(features[visual], budget, self.config.first)]  # (k,) span positions, sorted
        return compose(span, features, features[keep], keep), keep.tolist()
