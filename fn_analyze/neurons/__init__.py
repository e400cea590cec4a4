"""Neurons one by one: per-neuron statistics of the activations in one pass (max |activation|, mean,
second moment: `magnitude`), and random neuron sets matched to a selection on layer and magnitude
(`neuron_sets`)."""
