"""Sample streams for the recipes: the synthetic benchmark's splits, plus an easy curriculum split."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from crop.data.synth import SynthConfig, SynthSample, default_config, generate_sample

EASY_OBJECTS = (3, 8)
TINY_OBJECTS = (3, 4)  # the first rung of the curriculum: a few objects, so finding the asked one is easy
TRAIN_CARDS = (2, 4)  # more digit cards than the benchmark's 1-3: digits are the slowest thing to learn
DENSE_OBJECTS = (12, 16)  # the dense end of the training range (the held-out test split's density)
DENSE_SCALE = (0.09, 0.137)  # the small end of the training range of object sides (the test split's)


@cache
def stream_config(stream: str, image_size: int = 336) -> SynthConfig:
    """The generator knobs of a stream.

    ``train``, ``train-easy`` (sparse scenes), ``train-tiny`` (3-4 objects), ``train-dense``
    (12-16 small objects: the hard end of the training range, the density the test split is
    shifted to, drawn from the train split's own random stream), ``val`` or ``test``.
    Training streams carry :data:`TRAIN_CARDS` digit cards per scene; ``val``/``test`` are the
    benchmark's own splits, unchanged.
    """
    if stream == "train-tiny":
        return replace(default_config("train", image_size=image_size), n_objects=TINY_OBJECTS, n_cards=(2, 2))
    if stream == "train-easy":
        return replace(default_config("train", image_size=image_size), n_objects=EASY_OBJECTS, n_cards=TRAIN_CARDS)
    if stream == "train-dense":
        return replace(default_config("train", image_size=image_size), n_objects=DENSE_OBJECTS,
                       object_scale=DENSE_SCALE, n_cards=TRAIN_CARDS)
    if stream == "train":
        return replace(default_config("train", image_size=image_size), n_cards=TRAIN_CARDS)
    return default_config(stream, image_size=image_size)


def stream_sample(stream: str, index: int, data_seed: int, eval_seed: int, image_size: int = 336) -> SynthSample:
    """Sample ``index`` of ``stream``; train streams use ``data_seed``, val/test ``eval_seed``.

    Args:
        stream: ``"train"``, ``"train-easy"``, ``"val"`` or ``"test"``.
        index: sample index.
        data_seed: seed of the training streams.
        eval_seed: seed of the held-out streams.
        image_size: image side in pixels.

    Returns:
        The sample.
    """
    split = "train" if stream.startswith("train") else stream
    seed = data_seed if split == "train" else eval_seed
    return generate_sample(index, seed, split, stream_config(stream, image_size))
