"""From a trained adapter to an ordinary model for deployment, merged into the base it was trained on.

- `merge.py`: `merge_adapter`: loading the trained base, the 4-bit code check, PEFT's `merge_and_unload`, the parity
  gate and the atomic write;
- `plan.py`: every decision and refusal taken before any weights load (which base, which device, vocabularies);
- `report.py`: `MergeReport`, the merge from resolved inputs to results, its summary and the model card;
- `records.py`: the JSON training record written next to an adapter at save time, and the code check against it;
- `parity.py`: merged vs unmerged logits on fixed prompts.
"""
