"""The unlearning audit core: per-source sink manifests (`manifest`, `overlap`), the collateral of a forget set
(`collateral`), forget sets, the mask and hard methods and their certificates (`unlearn`), and `verify`.
Depends on the model, the formats and deployment's checkpoint reading; never on the trainer or the evaluation."""
