"""The model card (README.md) written into every merge and up-scaling output, as mergekit does:
the method, the input models and the recipe YAML that produced it (also saved as
``mergekit_config.yml``, so ``solar merge --config`` or ``mergekit-yaml`` can rerun it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CARD_FILE = "README.md"
RECIPE_FILE = "mergekit_config.yml"


def write_card(
    directory: Path, *, name: str, method: str, models: Sequence[Path], base_model: Path | None, recipe: str
) -> None:
    """Writes README.md (the card) and mergekit_config.yml (the recipe) into ``directory``."""
    base_text = f", with {base_model} as the base model" if base_model is not None else ""
    model_list = "\n".join(f"- {model}" for model in dict.fromkeys(map(str, models)))
    card = (
        f"---\ntags:\n- merge\n- solar_kernels\n---\n# {name}\n\n"
        f"This model was made with `solar_kernels` (a mergekit-compatible recipe).\n\n"
        f"## Merge method\n\n{method}{base_text}.\n\n"
        f"## Models merged\n\n{model_list}\n\n"
        f"## Configuration\n\nThe recipe that produced this model:\n\n```yaml\n{recipe.rstrip()}\n```\n"
    )
    (Path(directory) / CARD_FILE).write_text(card, encoding="utf-8")
    (Path(directory) / RECIPE_FILE).write_text(recipe.rstrip() + "\n", encoding="utf-8")
