"""Deployment of a trained NULL: reading trained and deployed checkpoints (`checkpoint_io`), routing a query to
its nearest surviving source (`routing`), KV-cache generation (`generate`) and the lm-evaluation-harness adapter
(`lm_eval_adapter`). Depends on the model and the formats; never on the audit, the evaluation or the trainer."""
