"""Glue shared by the pre-LLM baselines: turn chosen/merged visual tokens into a :class:`CompressedImage`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from crop.models.base import CompressedImage, ImageSpan


def keep_all(span: ImageSpan, features: torch.Tensor) -> tuple[CompressedImage, list[int]]:
    """The image unchanged (every visual and structure token), for budgets >= its visual tokens.

    Args:
        span: the image's span.
        features: ``(span.length, D)`` its features as the LLM would receive them.

    Returns:
        ``(image, full_resolution)`` with every visual position at full resolution.
    """
    source = torch.arange(span.length, device=features.device)  # (L,)
    image = CompressedImage(features, source, structure=span.length - span.visual_tokens)
    return image, span.visual_positions().tolist()


def compose(span: ImageSpan, features: torch.Tensor, tokens: torch.Tensor, source: torch.Tensor,
            mixing: Callable[[], torch.Tensor] | None = None) -> CompressedImage:
    """Visual output tokens + the structure tokens that go with them, in span order of their sources.

    Args:
        span: the image's span.
        features: ``(span.length, D)`` the image's features (structure tokens are copied from here).
        tokens: ``(M, D)`` the visual tokens that reach the LLM.
        source: ``(M,)`` distinct span positions (visual tokens) each output token takes its
            position from.
        mixing: ``() -> (M, span.length)`` what each of ``tokens`` is made of, for tokens that
            are not copies of their source (see :attr:`CompressedImage.mixing`); ``None``: copies.

    Returns:
        The compressed image; LLaVA-NeXT rows keep their newline iff they hold a source.
    """
    device = features.device
    source = source.to(device)
    structure = span.structure_positions(source.cpu()).to(device)  # (s,)
    all_source = torch.cat([source, structure])  # (M + s,)
    all_tokens = torch.cat([tokens, features[structure]])  # (M + s, D)
    order = torch.argsort(all_source)
    image = CompressedImage(all_tokens[order], all_source[order], structure=int(structure.numel()))
    if mixing is not None:
        token_mixing = mixing

        def composed() -> torch.Tensor:  # (M + s, length): structure tokens are copies
            copies = torch.eye(span.length, device=device)[structure]  # (s, length)
            return torch.cat([token_mixing().to(device, torch.float32), copies])[order]

        image.mixing = composed
    return image
