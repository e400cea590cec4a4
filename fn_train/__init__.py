"""Fine-tuning with functional networks masked (`key`) or isolated (`complement`)."""

import fn_analyze  # noqa: F401  (its import checks that `shared` is this project's, not a folder that shadows it)
