"""From a trained adapter to an ordinary model for deployment.

- `merge.py`: `merge_adapter`, the merge itself (PEFT's `merge_and_unload`), atomic write and parity gate;
- `plan.py`: every decision and refusal taken before any weights load;
- `parity.py`: merged vs unmerged logits on fixed prompts;
- `card.py`: the model card of a merged model;
- `records.py`: the records written next to an adapter at save time and read back here.
"""
