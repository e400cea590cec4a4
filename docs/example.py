"""A notebook's worth of the Python API, to paste cell by cell (or run: `python docs/example.py`),
from the repository root after the set-up and `fn-analyze demo-data --out demo`.

Record the demo questions' MLP activations in memory, find networks with `NetworkICA`, look at
them, switch one off in the model and measure what that does to the answers' loss on records the
ICA was not fitted on. Nothing is written to disk. On the 2-core project machine: 58 s idle
(2026-12-06), 2 min 38 s while other jobs kept it at load 14-17 (2026-12-07; threads as the library
chose them, said in its first log line).
"""

# %% Record activations in memory: the input of every down-projection, for each real token.
import json
import logging

# The project before torch: importing it first lets torch's idle threads sleep (docs/commands.md, Python API).
from fn_analyze.networks.ica import NetworkICA
from shared.ablation import Ablation, NeuronMeans
from shared.arch import find_down_projections
from shared.figures import networks_figure
from shared.hooks import captured_down_proj_inputs
from shared.masked_model import MaskedModel
from shared.masks import MaskFile
from shared.models import load_causal_lm, load_tokenizer, model_info

# isort: split
import numpy as np
import torch

logging.basicConfig(level=logging.INFO, format="%(message)s")  # threads chosen, ICA progress; leave out for silence
model = load_causal_lm("smollm2-135m", dtype=torch.float32, device="cpu")
tokenizer = load_tokenizer("smollm2-135m")
records = [json.loads(line) for line in open("demo/data.jsonl", encoding="utf-8")][:120]
texts = [f"{r['question']} {r['answer']}" for r in records]
fitted, held_out = texts[:100], texts[100:]  # the networks are found on the first 100, measured on the rest

projections = find_down_projections(model)
rows = []
with captured_down_proj_inputs(projections) as store, torch.no_grad():
    for text in fitted:
        model(**tokenizer(text, return_tensors="pt"))
        rows.append(torch.cat([store[p.layer][0] for p in projections], dim=1).numpy())  # tokens x (layers*width)
X = np.concatenate(rows).astype(np.float16).astype(np.float32)  # as collect stores them: float16
layers = [p.layer for p in projections]
print(f"{X.shape[0]} tokens x {X.shape[1]} neurons ({len(layers)} layers)")

# %% Find networks: an estimator, fitted on the array; it writes and prints nothing.
ica = NetworkICA(n_components=10, runs=3).fit(X, layers=layers)
print(f"k={ica.n_components_}: {len(ica.networks_)} stable networks, {len(ica.unstable_)} left out")
for network in ica.networks_[:5]:
    spread = {layer: len(neurons) for layer, neurons in network.layers.items()}
    print(f"network {network.id}: {network.size} neurons, quality {network.stats['quality']}, per layer {spread}")

# %% The networks as a mask file of this model (ica.to_mask_file(...).save("mine.json") keeps it).
mask: MaskFile = ica.to_mask_file(model_info(model, "smollm2-135m"))
fig = networks_figure(mask)  # a matplotlib Figure: shown by a notebook, written by shared.figures.save_png


# %% Switch network 0 off (its neurons at their mean activation) and measure the answers' loss.
def loss(m, text: str) -> float:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return float(m(**batch, labels=batch["input_ids"]).loss)


# Each neuron's mean activation over the fitted tokens: what the ICA centered the rows by (ica.mean_).
means = np.full((model.config.num_hidden_layers, X.shape[1] // len(layers)), np.nan, dtype=np.float32)
means[layers] = ica.mean_.reshape(len(layers), -1)
base = np.mean([loss(model, text) for text in held_out])
mean = Ablation("mean", means=NeuronMeans(means, "the demo questions' tokens", X.shape[0]))
with MaskedModel(model, mask, mode="key", networks=[0], ablation=mean) as masked:
    off = np.mean([loss(masked, text) for text in held_out])
print(f"loss {base:.3f} -> {off:.3f} with network 0 ({mask.networks[0].size} neurons) at its mean")
