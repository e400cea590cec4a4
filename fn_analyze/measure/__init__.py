"""Measuring what networks do: scoring a model on held-out rows (`scoring`), masks against matched
random sets (`evaluate`), and a fine-tuned folder against its base (`tuned`)."""
