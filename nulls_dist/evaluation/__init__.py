"""The unlearning evaluation: metrics on one deployed model (`metrics`), the evaluation of several deployments
against a retrain oracle (`evaluate`), post-hoc GA / NPO baselines (`posthoc`), source texts from the shards
(`source_text`) and the report (`report`)."""
