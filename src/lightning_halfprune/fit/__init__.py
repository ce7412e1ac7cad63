"""The Lightning-aware parts the callback delegates to: guard, distillation, rebinding, batches."""
