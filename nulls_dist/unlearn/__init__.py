"""Unlearning tools for trained NULL models: per-source sink manifests (`manifest`), forget sets, mask/hard
unlearning and audit certificates (`unlearn`), routed generation (`routing`, `generate`) and the unlearning
evaluation (`evaluate`). Depends on the model, the sink assignment, the data schema and DeepSpeed's checkpoint
utilities; never on the trainer."""
