"""The docs' Python is callable as they show it.

Every name of the project's packages that README.md and docs/*.md mention (`fn_analyze.x.y`, in
prose or code) exists, and a call the prose writes out binds to that function's signature. Every
```python block runs as written, in a fresh process, in a folder set up as a user's would be: the
embedded model's name resolves to a tiny model (its cache folder holds that model instead of
SmolLM2), the files a snippet names exist there (data.jsonl, the demo mask file, an fn-train run),
and the few names a snippet uses without defining them (`model`, `batch`, `other`, `means`, `X`,
each described in the docs' comments) are defined first, by PRELUDE. The snippets are not edited.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.processes import ROOT, subprocess_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("fn_analyze", "fn_train", "shared")
_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_SPAN = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"\b(?:" + "|".join(PACKAGES) + r")(?:\.\w+)+")


def python_blocks() -> list[tuple[str, str]]:
    """(where, code) of every ```python block, dedented as a list item's block must be."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{path.name}:{line}", textwrap.dedent(match.group(2))))
    return found


def _resolve(dotted: str) -> object:
    """The object a dotted name means: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def _mentions() -> list[tuple[str, str]]:
    """(where, code) of every inline code span and python block that names a package's module."""
    spans = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        spans += [(path.name, span) for span in _SPAN.findall(text) if _DOTTED.search(span)]
    return spans + [(where, code) for where, code in python_blocks()]


def test_every_project_name_the_docs_mention_exists() -> None:
    missing = []
    for where, code in _mentions():
        for dotted in _DOTTED.findall(code):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError) as exc:
                missing.append(f"{where}: {dotted} ({type(exc).__name__}: {exc})")
    assert not missing, "\n".join(missing)


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted_name(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def test_calls_the_prose_writes_out_bind_to_the_signatures() -> None:
    """`fn_analyze.neurons.magnitude.stats_from_activations(folder, model, ["mean"])` in a sentence:
    that many positional arguments and those keywords fit the function."""
    wrong, checked = [], 0
    for where, span in _mentions():
        try:
            tree = ast.parse(span.strip())
        except SyntaxError:
            continue
        for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
            name = _dotted_name(call.func)
            if name is None or not name.startswith(PACKAGES):
                continue
            target = _resolve(name)
            try:
                inspect.signature(target).bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})
            except TypeError as exc:
                wrong.append(f"{where}: `{ast.unparse(call)}`: {exc}")
            checked += 1
    assert checked >= 1, "no call of a project function found in the docs' prose: the check checks nothing"
    assert not wrong, "\n".join(wrong)


# Names the docs' snippets use and leave to the reader, as their comments describe them: the model and
# a tokenized batch (README), another mask file of the same model, per-neuron means (a NeuronMeans),
# and token rows X of the captured neurons.
PRELUDE = """
import numpy as np
from shared.ablation import NeuronMeans
from shared.masks import MaskFile
from shared.models import load_causal_lm, load_tokenizer

model = load_causal_lm("smollm2-135m", device="cpu")
tokenizer = load_tokenizer("smollm2-135m")
batch = tokenizer(["The capital of France is"], return_tensors="pt")
other = MaskFile.load("other.json")
means = NeuronMeans(np.full((2, 176), 0.25, dtype=np.float32), "planted", 100)
X = np.random.default_rng(0).normal(size=(64, 352)).astype(np.float32)
"""


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory, tiny_lm_dir: Path, demo_dir: Path) -> Path:
    """A folder as the docs assume one: the embedded model's cache holds a tiny model, and the files
    the snippets name are there."""
    from transformers import AutoModelForCausalLM

    from fn_train.trainer import train
    from tests.helpers.masks import write_mask
    from tests.helpers.training import small_run

    folder = tmp_path_factory.mktemp("user")
    shutil.copytree(tiny_lm_dir, folder / "cache" / "smollm2-135m-instruct")
    shutil.copy(demo_dir / "data.jsonl", folder / "data.jsonl")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    four = {i: {0: list(range(i, 176, 7)), 1: list(range(i + 1, 176, 9))} for i in range(4)}
    (folder / "mask_artifacts").mkdir()
    write_mask(model, four, folder / "mask_artifacts" / "smollm2-demo.json")
    write_mask(model, {0: {0: list(range(0, 176, 5))}}, folder / "other.json")
    mask = folder / "mask_artifacts" / "smollm2-demo.json"
    train(small_run(tiny_lm_dir, demo_dir, folder / "runs" / "ft", mask, networks="0"))
    return folder


@pytest.mark.slow  # a fresh interpreter per snippet (torch, transformers), one short training run, a small ICA
@pytest.mark.parametrize(("where", "code"), python_blocks(), ids=[where for where, _ in python_blocks()])
def test_the_docs_python_blocks_run_as_written(user_folder: Path, where: str, code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        cwd=user_folder, capture_output=True, text=True, timeout=600,
        env=subprocess_env(FN_CACHE_DIR=str(user_folder / "cache")),
    )  # fmt: skip
    assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"
