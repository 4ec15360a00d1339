"""The sentiment study built on the library: GPT-2 fine-tuned to label Rotten Tomatoes reviews, scored, swept, and
trained with DPO. ``train_sentiment.py`` and ``train_dpo.py`` at the repository root run it.

The library (``lora_fast``) never imports this package; this package imports the library.
"""

__all__: list[str] = []
