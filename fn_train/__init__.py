"""Fine-tuning with functional networks masked (`key`) or isolated (`complement`)."""
