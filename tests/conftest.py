"""Shared fixtures: offline mode, seeding, demo data, tiny causal LM folders with their own tokenizer."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the console scripts do (shared/threads.py): OpenMP threads without work sleep. Spinning ones make each
# small operation of the tests' tiny models wait on a thread that another process's work has taken the core
# from: on 2 shared cores, a tiny model's layer then took milliseconds instead of microseconds.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fn_analyze.demo_data import write_demo_data
from tests.helpers.tiny_models import tiny_model

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    write_demo_data(folder, seed=0, n_collect=60, n_train=32, n_eval=16)
    return folder


@pytest.fixture(scope="session")
def big_data(tmp_path_factory) -> Path:
    """1,200 demo records: enough for a collect with 1 MB shards to be stopped mid-run."""
    folder = tmp_path_factory.mktemp("big")
    write_demo_data(folder, seed=1, n_collect=1200, n_train=2, n_eval=2)
    return folder / "data.jsonl"


@pytest.fixture(scope="session")
def big_data_collected(tmp_path_factory, tiny_lm_dir: Path, big_data: Path) -> Path:
    """The activations of an uninterrupted collect of `big_data` (1 MB shards) on the tiny LLaMA:
    what an interrupted and resumed run must end with."""
    from fn_analyze.record.collect import CollectConfig, collect

    out = tmp_path_factory.mktemp("big-collected") / "acts"
    collect(CollectConfig(dataset=str(big_data), out=out, model=str(tiny_lm_dir), shard_size_mb=1))
    return out


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_dir: Path):
    """A byte-level BPE tokenizer trained on the demo data, with a ChatML template."""
    import json

    texts = []
    for line in (demo_dir / "data.jsonl").read_text().splitlines():
        record = json.loads(line)
        texts += [record["question"], record["answer"]]
    return _train_tokenizer(texts)


def _save_tiny_lm(model_type: str, folder: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if model_type == "gpt2":
        model = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=128, **ids)
    else:
        model = tiny_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=128, **ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny LLaMA (2 layers, 176 neurons each) with its tokenizer and chat template."""
    return _save_tiny_lm("llama", tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny GPT-2 (Conv1D layers, 2 layers x 256 neurons) with the same tokenizer."""
    return _save_tiny_lm("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), tiny_tokenizer)
