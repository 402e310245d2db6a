"""The fine-tuning strategies by `--method` name: the one place a method name picks behaviour."""

from __future__ import annotations

from meddiff.errors import MeddiffError
from meddiff.training.methods.finetune.dreambooth import DreamBoothFinetune
from meddiff.training.methods.finetune.lora import LoraFinetune
from meddiff.training.methods.finetune.strategy import FinetuneStrategy
from meddiff.training.methods.finetune.text_encoder import TextEncoderFinetune
from meddiff.training.methods.finetune.textual_inversion import TextualInversionFinetune
from meddiff.training.methods.finetune.unet import UnetFinetune, UnetTextFinetune

STRATEGIES: dict[str, type[FinetuneStrategy]] = {
    strategy.name: strategy
    for strategy in (
        UnetFinetune,
        UnetTextFinetune,
        TextEncoderFinetune,
        DreamBoothFinetune,
        LoraFinetune,
        TextualInversionFinetune,
    )
}
FINETUNE_METHODS: tuple[str, ...] = tuple(STRATEGIES)


def finetune_strategy(name: str) -> type[FinetuneStrategy]:
    """The strategy class of `--method name`; a one-line error naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):  # TypeError: a YAML list or mapping where a name belongs
        raise MeddiffError(f"unknown fine-tuning method {name!r}; choose from {', '.join(FINETUNE_METHODS)}") from None


def default_learning_rate(name: str) -> float:
    """The learning rate `meddiff finetune --method name` uses unless one is given."""
    return finetune_strategy(name).default_learning_rate
